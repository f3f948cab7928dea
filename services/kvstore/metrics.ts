/** The kvstore's Prometheus metrics: sessions, segment bytes, pages per tier, commits. */
import { Counter, Gauge, type Registry } from "prom-client";

export interface KvStoreMetrics {
  sessions: Gauge;
  segmentBytes: Gauge;
  capacityBytes: Gauge;
  pages: Gauge<"tier">;
  commits: Counter;
  checksumFailures: Counter;
  rejected: Counter<"reason">;
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

export function createKvStoreMetrics(registry: Registry): KvStoreMetrics {
  return {
    sessions: new Gauge({ name: "freekv_kvstore_sessions", help: "Sessions with segments in the kvstore", registers: [registry] }),
    segmentBytes: new Gauge({ name: "freekv_kvstore_segment_bytes", help: "Bytes of shared-memory segments owned by the kvstore (host KV memory in use)", registers: [registry] }),
    capacityBytes: new Gauge({ name: "freekv_kvstore_capacity_bytes", help: "Shared memory the kvstore may hand out (FREEKV_KVSTORE_CAPACITY_BYTES, or the free space of /dev/shm at start)", registers: [registry] }),
    pages: new Gauge({
      name: "freekv_kvstore_pages",
      help: "Committed pages per tier (host = the HND page store in shared memory), summed over layers",
      labelNames: ["tier"],
      registers: [registry],
    }),
    commits: new Counter({ name: "freekv_kvstore_commits_total", help: "CommitPages calls accepted", registers: [registry] }),
    checksumFailures: new Counter({ name: "freekv_kvstore_checksum_failures_total", help: "Committed pages whose CRC32C did not match", registers: [registry] }),
    rejected: new Counter({ name: "freekv_kvstore_rejected_total", help: "Requests refused", labelNames: ["reason"], registers: [registry] }),
    directoryFailures: new Counter({ name: "freekv_kvstore_directory_failures_total", help: "Session directory operations that failed (the call got UNAVAILABLE)", labelNames: ["op"], registers: [registry] }),
    directoryUp: new Gauge({ name: "freekv_kvstore_directory_up", help: "1 while the session directory answers (health is NOT_SERVING otherwise)", registers: [registry] }),
    corruptPages: new Counter({ name: "freekv_kvstore_corrupt_pages_total", help: "Committed pages whose CRC32C changed after the commit (found by the scrubber; the session answers DATA_LOSS)", registers: [registry] }),
    scrubbedBytes: new Counter({ name: "freekv_kvstore_scrubbed_bytes_total", help: "Bytes of committed pages the scrubber re-read and checked", registers: [registry] }),
    scrubPassSeconds: new Gauge({ name: "freekv_kvstore_scrub_pass_seconds", help: "Duration of the last full scrubber pass over every committed page (the longest a corruption can go unseen)", registers: [registry] }),
  };
}
