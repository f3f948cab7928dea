/** The kvstore's environment variables (see the README's configuration table). */
import { readFileSync, statfsSync } from "node:fs";
import { totalmem } from "node:os";
import { z } from "zod";
import { flag, host, intInRange, logLevel, mallocMmapThreshold, nonNegativeInt, port, positiveInt, serviceSchema, writeStallMs } from "../common/config.js";
// The compute's variables are known here too (a pod's two containers may share one ConfigMap):
// its schema declares them (serviceSchema) when its module loads.
import "../compute/config.js";

export const kvstoreConfigSchema = z.object({
  FREEKV_KVSTORE_HOST: host("127.0.0.1"),
  FREEKV_KVSTORE_PORT: port(50052),
  FREEKV_KVSTORE_METRICS_PORT: port(9092),
  /** TLS of the kvstore's gRPC server (common/tls.ts): certificate and key files; with a client CA, mutual TLS. */
  FREEKV_KVSTORE_TLS_CERT_FILE: z.string().min(1).optional(),
  FREEKV_KVSTORE_TLS_KEY_FILE: z.string().min(1).optional(),
  FREEKV_KVSTORE_TLS_CLIENT_CA_FILE: z.string().min(1).optional(),
  /** Address of the metrics (and /livez) HTTP server; unset: FREEKV_KVSTORE_HOST. */
  FREEKV_KVSTORE_METRICS_HOST: z.string().min(1).optional(),
  /** "memory" or redis://host:port/db */
  FREEKV_DIRECTORY: z
    .string()
    .regex(/^(memory|rediss?:\/\/.+)$/, 'must be "memory" or a redis:// URL')
    .default("memory"),
  FREEKV_DIRECTORY_PREFIX: z.string().min(1).default("freekv:"),
  /** How often the session directory is pinged; health is NOT_SERVING while it does not answer. */
  FREEKV_DIRECTORY_PROBE_MS: positiveInt(1000),
  /** Bytes of shared memory all sessions may commit; 0 = defaultCapacity() at start (with the adopted sessions' bytes). */
  FREEKV_KVSTORE_CAPACITY_BYTES: nonNegativeInt(0),
  /**
   * Sessions this kvstore holds at most (live, being created or imported). Each maps four
   * segments here and in its compute, whatever its size: past ~16K the process's memory maps
   * (vm.max_map_count, 65530 by default) run out and every allocation fails.
   */
  FREEKV_KVSTORE_MAX_SESSIONS: intInRange(4096, 1, 16384),
  /** Tokens of context a session's memory grows by (its reservation is a multiple, capped by its max context). */
  FREEKV_KVSTORE_EXTENT_TOKENS: positiveInt(2048),
  /**
   * How a reservation's memory is committed: 0 = fallocate (one call, under the file's lock; the
   * pages are zeroed at their first touch), N = write faults through the kvstore's mapping from N
   * threads (allocated and zeroed in parallel).
   */
  FREEKV_KVSTORE_COMMIT_THREADS: intInRange(0, 0, 64),
  /** Keep live sessions' segments at shutdown (so a restarted compute can re-attach). */
  FREEKV_KVSTORE_PERSIST: flag(false),
  /** Rate at which the scrubber re-reads committed pages to check their CRC32C (0: off). */
  FREEKV_SCRUB_BYTES_PER_S: nonNegativeInt(256 << 20),
  /** Read by the addon itself when it loads (getenv); validated here so that a bad value fails at start. */
  FREEKV_MALLOC_MMAP_THRESHOLD: mallocMmapThreshold(),
  /** How long a session export waits for a peer that stopped reading before it ends the call (DEADLINE_EXCEEDED); 0: no limit. */
  FREEKV_WRITE_STALL_MS: writeStallMs(),
  FREEKV_SHUTDOWN_GRACE_MS: positiveInt(10_000),
  FREEKV_LOG_LEVEL: logLevel(),
});
// Known to both services' check for misspelt variable names.
serviceSchema(kvstoreConfigSchema);

export type KvStoreConfig = z.infer<typeof kvstoreConfigSchema>;

/**
 * Memory this process may use: its cgroup's limit (v2 memory.max, v1 memory.limit_in_bytes) when
 * there is one, else the host's memory.
 */
export function memoryLimitBytes(): number {
  let limit = totalmem();
  const own = (() => {
    try {
      return readFileSync("/proc/self/cgroup", "utf8");
    } catch {
      return "";
    }
  })();
  const v2 = /^0::(.*)$/m.exec(own)?.[1];
  const v1 = /^\d+:(?:[^:]*,)?memory(?:,[^:]*)?:(.*)$/m.exec(own)?.[1];
  const candidates = [v2 !== undefined ? `/sys/fs/cgroup${v2}/memory.max` : "", v1 !== undefined ? `/sys/fs/cgroup/memory${v1}/memory.limit_in_bytes` : ""];
  for (const f of candidates.filter(Boolean)) {
    try {
      const n = Number(readFileSync(f, "utf8").trim());
      if (Number.isFinite(n) && n > 0) limit = Math.min(limit, n);
    } catch {
      // not mounted here, or "max": no limit from it
    }
  }
  return limit;
}

/**
 * The capacity when FREEKV_KVSTORE_CAPACITY_BYTES is 0: the free space of /dev/shm, but no more
 * than this process's memory limit less 512 MiB for its own working set. The kvstore allocates
 * what it counts (its reservations), and a tmpfs larger than memory fails with the OOM killer
 * instead of ENOSPC, so the memory bounds the default too.
 *
 * `shmFree` is measured at start, before the sessions a previous kvstore process kept are adopted
 * (KvStore.adopt). Their memory is already missing from that free space, and adopt() counts their
 * reservations as used again; so `adoptedBytes`, the adopted reservations' bytes that free space
 * left out, are added back to it: capacity = free space at start + adopted bytes, which leaves a
 * restarted kvstore as much room for new reservations as it had before the restart (without them
 * the adopted sessions counted twice). The memory limit is a total, not what is free: the adopted
 * sessions' memory is part of what it bounds, so they stay counted against it as used.
 */
export function defaultCapacity(adoptedBytes = 0, shmFree = shmFreeBytes(), memoryLimit = memoryLimitBytes()): number {
  return Math.max(0, Math.min(shmFree + adoptedBytes, memoryLimit - 512 * 2 ** 20));
}

export function shmFreeBytes(): number {
  try {
    const s = statfsSync("/dev/shm");
    return Number(s.bavail) * Number(s.bsize);
  } catch {
    return 0;
  }
}
