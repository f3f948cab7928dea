/** The kvstore's Prometheus metrics: sessions, reserved and allocated bytes, capacity, pages per tier, commits. */
import { Counter, Gauge, type Registry } from "prom-client";

export interface KvStoreMetrics {
  sessions: Gauge;
  segmentBytes: Gauge;
  /** Bytes committed to sessions (what the capacity bounds). */
  reservedBytes: Gauge;
  /** Reservations that grew (ReserveContext, or AttachSession with reserve_tokens). */
  reservations: Counter;
  capacityBytes: Gauge;
  pages: Gauge<"tier">;
  commits: Counter;
  checksumFailures: Counter;
  rejected: Counter<"reason">;
  /** Background commits of a reservation (caller_commits) that failed: the caller meets the shortage when it commits what it writes. */
  backgroundCommitFailures: Counter;
  /** Session directory operations that failed (Redis unreachable). */
  directoryFailures: Counter<"op">;
  /** 1 while the session directory answers. */
  directoryUp: Gauge;
  /** Committed pages the scrubber found changed (each marks its session corrupt). */
  corruptPages: Counter;
  scrubbedBytes: Counter;
  /** Seconds the last full scrubber pass over every committed page took. */
  scrubPassSeconds: Gauge;
}

/**
 * `allocated` reads the bytes the segments really hold (st_blocks) at each scrape:
 * freekv_kvstore_allocated_bytes.
 */
export function createKvStoreMetrics(registry: Registry, allocated?: () => number): KvStoreMetrics {
  if (allocated) {
    new Gauge({
      name: "freekv_kvstore_allocated_bytes",
      help: "Bytes of memory the sessions' shared-memory segments really hold (st_blocks * 512); at most freekv_kvstore_reserved_bytes",
      registers: [registry],
      collect() {
        this.set(allocated());
      },
    });
  }
  return {
    sessions: new Gauge({ name: "freekv_kvstore_sessions", help: "Sessions with segments in the kvstore", registers: [registry] }),
    segmentBytes: new Gauge({ name: "freekv_kvstore_segment_bytes", help: "Bytes of shared memory committed to sessions (host KV memory in use; equals freekv_kvstore_reserved_bytes)", registers: [registry] }),
    reservedBytes: new Gauge({
      name: "freekv_kvstore_reserved_bytes",
      help: "Bytes of shared memory committed to sessions: small segments whole, each store as far as its reservation (what FREEKV_KVSTORE_CAPACITY_BYTES bounds)",
      registers: [registry],
    }),
    reservations: new Counter({ name: "freekv_kvstore_reservations_total", help: "Session reservations that grew (memory committed for more context)", registers: [registry] }),
    capacityBytes: new Gauge({ name: "freekv_kvstore_capacity_bytes", help: "Shared memory the kvstore may commit to sessions (FREEKV_KVSTORE_CAPACITY_BYTES, or the free space of /dev/shm at start bounded by the memory limit)", registers: [registry] }),
    pages: new Gauge({
      name: "freekv_kvstore_pages",
      help: "Committed pages per tier (host = the HND page store in shared memory), summed over layers",
      labelNames: ["tier"],
      registers: [registry],
    }),
    commits: new Counter({ name: "freekv_kvstore_commits_total", help: "CommitPages calls accepted", registers: [registry] }),
    checksumFailures: new Counter({ name: "freekv_kvstore_checksum_failures_total", help: "Committed pages whose CRC32C did not match", registers: [registry] }),
    rejected: new Counter({ name: "freekv_kvstore_rejected_total", help: "Requests refused", labelNames: ["reason"], registers: [registry] }),
    backgroundCommitFailures: new Counter({ name: "freekv_kvstore_background_commit_failures_total", help: "Reservations whose memory the kvstore could not commit in the background (caller_commits; the caller gets the error when it commits the pages it writes)", registers: [registry] }),
    directoryFailures: new Counter({ name: "freekv_kvstore_directory_failures_total", help: "Session directory operations that failed (the call got UNAVAILABLE)", labelNames: ["op"], registers: [registry] }),
    directoryUp: new Gauge({ name: "freekv_kvstore_directory_up", help: "1 while the session directory answers (health is NOT_SERVING otherwise)", registers: [registry] }),
    corruptPages: new Counter({ name: "freekv_kvstore_corrupt_pages_total", help: "Committed pages whose CRC32C changed after the commit (found by the scrubber; the session answers DATA_LOSS)", registers: [registry] }),
    scrubbedBytes: new Counter({ name: "freekv_kvstore_scrubbed_bytes_total", help: "Bytes of committed pages the scrubber re-read and checked", registers: [registry] }),
    scrubPassSeconds: new Gauge({ name: "freekv_kvstore_scrub_pass_seconds", help: "Duration of the last full scrubber pass over every committed page (the longest a corruption can go unseen)", registers: [registry] }),
  };
}
