/**
 * The kvstore process: owns the shared-memory segments of every session and serves
 * freekv.v1.KvStoreService, grpc.health.v1 and reflection; /metrics on its own port.
 */
import { serverCredentials } from "../common/tls.js";
import { Server } from "@grpc/grpc-js";
import { KvStoreServiceService } from "../../proto/gen/freekv/v1/kvstore.js";
import { loadConfigOrExit, redactCredentials } from "../common/config.js";
import { Health } from "../common/health.js";
import { rejectMalformed } from "../common/malformed.js";
import { bindServer, installDrain } from "../common/lifecycle.js";
import { createLogger } from "../common/log.js";
import { createRegistry, startMetricsServer } from "../common/metrics.js";
import { addReflection } from "../common/reflection.js";
import { defaultCapacity, kvstoreConfigSchema, shmFreeBytes } from "./config.js";
import { openDirectory, type SessionDirectory } from "./directory.js";
import { watchDirectory } from "./directory-health.js";
import { createKvStoreMetrics } from "./metrics.js";
import { kvstoreService } from "./service.js";
import { SEGMENT_KINDS, directoryTag, setDirectoryKind, sweepStaleSegments } from "./segments.js";
import { Scrubber } from "./scrubber.js";
import { KvStore } from "./store.js";
import { createTransferMetrics, transferService } from "./transfer.js";
import { KvStoreTransferServiceService } from "../../proto/gen/freekv/v1/kvstore.js";

export const KVSTORE_SERVICE = "freekv.v1.KvStoreService";

/** The segment names the directory's records hold (kept by the sweep). */
async function directorySegmentNames(directory: SessionDirectory): Promise<Set<string>> {
  const names = new Set<string>();
  for (const id of await directory.list()) {
    const rec = await directory.get(id);
    if (rec) for (const k of SEGMENT_KINDS) names.add(rec.segments[k].name);
  }
  return names;
}

async function main(): Promise<void> {
  const config = loadConfigOrExit("kvstore", kvstoreConfigSchema);
  const log = createLogger("kvstore", config.FREEKV_LOG_LEVEL);
  const registry = createRegistry("kvstore");
  // The store's real allocation, read at each scrape once the store exists.
  let allocatedSource: () => number = () => 0;
  const metrics = createKvStoreMetrics(registry, () => allocatedSource());
  const directory = await openDirectory(config.FREEKV_DIRECTORY, config.FREEKV_DIRECTORY_PREFIX).catch((e: Error) => {
    // The URL carries the Redis password: printed masked.
    log.fatal({ err: redactCredentials(e.message) }, "FREEKV_DIRECTORY: cannot open the session directory");
    process.stderr.write(`kvstore: FREEKV_DIRECTORY=${redactCredentials(config.FREEKV_DIRECTORY)}: ${redactCredentials(e.message)}\n`);
    process.exit(2);
  });
  // Segments left by a kvstore that was killed (no shutdown ran): with the in-memory directory
  // nothing can reach them again; with Redis, those its records name are adopted below instead,
  // and the rest of this directory's (tagged with it) were made or released half-way: removed.
  // Before the capacity is read, so their space counts as free.
  // A directory that cannot be read now may name any of them: nothing is removed then.
  setDirectoryKind(config.FREEKV_DIRECTORY === "memory" ? "memory" : "persistent", directoryTag(config.FREEKV_DIRECTORY, config.FREEKV_DIRECTORY_PREFIX));
  const keep = await directorySegmentNames(directory).catch((e: Error) => {
    log.warn({ err: e.message }, "the session directory cannot be read at start: segments left by a kvstore that is gone are not swept this time");
    return undefined;
  });
  const swept = keep ? sweepStaleSegments(keep) : [];
  if (swept.length) log.info({ removed: swept.length, segments: swept }, "removed session segments left by a kvstore process that is gone");
  // A capacity left to the default follows the free space of /dev/shm, measured here, before the
  // adoption: the adopted sessions' memory is missing from it and adopt() counts it as used, so
  // adopt() adds their bytes back (defaultCapacity) and they count once.
  const fixedCapacity = config.FREEKV_KVSTORE_CAPACITY_BYTES;
  const shmFree = fixedCapacity ? 0 : shmFreeBytes();
  const store = new KvStore(directory, fixedCapacity || defaultCapacity(0, shmFree), log, metrics, false, config.FREEKV_KVSTORE_EXTENT_TOKENS, config.FREEKV_KVSTORE_COMMIT_THREADS);
  store.maxSessions = config.FREEKV_KVSTORE_MAX_SESSIONS;
  allocatedSource = () => store.allocatedBytes();
  const adopted = await store.adopt(fixedCapacity ? undefined : (adoptedBytes) => defaultCapacity(adoptedBytes, shmFree));
  const capacity = store.capacityBytes;
  metrics.capacityBytes.set(capacity);
  const scrubber = new Scrubber(store, { bytesPerSecond: config.FREEKV_SCRUB_BYTES_PER_S, log, metrics });
  store.scrubber = scrubber;
  scrubber.start();
  if (config.FREEKV_KVSTORE_PERSIST && directory.kind === "memory") {
    log.warn("FREEKV_KVSTORE_PERSIST=1 with the in-memory directory: a restarted compute re-attaches, but a restarted kvstore cannot find the kept segments (use FREEKV_DIRECTORY=redis://...)");
  }

  const server = new Server({ "grpc.max_receive_message_length": 64 << 20 });
  const service = rejectMalformed(KvStoreServiceService, kvstoreService(store, log));
  server.addService(service.definition, service.implementation);
  const transfer = rejectMalformed(KvStoreTransferServiceService, transferService(store, log, createTransferMetrics(registry), { writeStallMs: config.FREEKV_WRITE_STALL_MS }));
  server.addService(transfer.definition, transfer.implementation);
  const health = new Health([KVSTORE_SERVICE]);
  health.addToServer(server);
  addReflection(server, ["freekv/v1/kvstore.proto"], [KVSTORE_SERVICE, "freekv.v1.KvStoreTransferService"]);

  let creds;
  try {
    creds = serverCredentials("FREEKV_KVSTORE", { cert: config.FREEKV_KVSTORE_TLS_CERT_FILE, key: config.FREEKV_KVSTORE_TLS_KEY_FILE, clientCa: config.FREEKV_KVSTORE_TLS_CLIENT_CA_FILE });
  } catch (e) {
    process.stderr.write(`kvstore: ${(e as Error).message}\n`);
    process.exit(2);
  }
  const port = await bindServer(server, config.FREEKV_KVSTORE_HOST, config.FREEKV_KVSTORE_PORT, creds);
  const metricsServer = await startMetricsServer(registry, config.FREEKV_KVSTORE_METRICS_PORT, config.FREEKV_KVSTORE_METRICS_HOST ?? config.FREEKV_KVSTORE_HOST, log);
  installDrain({
    server,
    health,
    log,
    graceMs: config.FREEKV_SHUTDOWN_GRACE_MS,
    cleanup: async () => {
      directoryHealth.stop();
      scrubber.stop();
      await store.shutdown(config.FREEKV_KVSTORE_PERSIST);
      await metricsServer.close();
    },
  });
  health.set("SERVING");
  const directoryHealth = watchDirectory(directory, health, log, metrics, config.FREEKV_DIRECTORY_PROBE_MS);
  store.onDirectoryFailure = (e) => directoryHealth.failed(e);
  log.info(
    { grpcPort: port, metricsPort: metricsServer.port, directory: directory.kind, capacityBytes: capacity, adopted, persist: config.FREEKV_KVSTORE_PERSIST, scrubBytesPerS: config.FREEKV_SCRUB_BYTES_PER_S },
    "kvstore listening",
  );
  // One machine-readable line for supervisors (tools/dev/run.ts, tests).
  process.stdout.write(`${JSON.stringify({ ready: "kvstore", grpcPort: port, metricsPort: metricsServer.port, host: config.FREEKV_KVSTORE_HOST })}\n`);
}

main().catch((e: unknown) => {
  process.stderr.write(`kvstore: ${(e as Error).stack ?? String(e)}\n`);
  process.exit(1);
});
