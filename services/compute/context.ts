/**
 * ComputeContext: what every compute handler gets. Built once at start: config, log, metrics,
 * the kvstore client, the SessionManager, the engine (loadAddon().Engine on FREEKV_BACKEND) and
 * the served model (loaded right after the server listens: loadServedModel).
 */
import type { ChannelCredentials } from "@grpc/grpc-js";
import { channelCredentials } from "../common/tls.js";
import { Counter, Gauge, Histogram, type Registry } from "prom-client";
import { loadAddon, type Engine } from "../../native/binding.js";
import { DType } from "../../proto/gen/freekv/v1/common.js";
import type { Logger } from "../common/log.js";
import { KvStoreClient } from "./kvstore-client.js";
import type { ComputeConfig } from "./config.js";
import { AdmissionQueue } from "./generate/admission.js";
import { defaultPrefillChunkTokens, ModelScheduler } from "./generate/scheduler.js";
import type { SessionOwners } from "./sessions/owners.js";
import { TenantAuth } from "./auth.js";
import { builtinModelDir, loadModelAsync, type LoadedModel } from "./model/loader.js";
import { NO_MODEL, ServedModel } from "./model/served.js";
import { SessionManager } from "./sessions/manager.js";
import { divergedError } from "./sessions/diverged.js";
import { defaultExchangeCapacity, ExchangeBudget, shmSpace } from "./attention/exchange.js";

export interface ComputeMetrics {
  registry: Registry;
  sessions: Gauge;
  degradedSessions: Gauge;
  attentionRequests: Counter<"op">;
  attentionSeconds: Histogram<"op">;
  /** Sessions per engine.decode call of the Attention stream (one layer). */
  decodeBatchSize: Histogram;
  /** Sessions per Generate decode step (the whole model). */
  modelStepBatchSize: Histogram;
  /** One engine.decode call of the Attention stream: one layer for a batch of sessions. */
  decodeLayerSeconds: Histogram;
  /** One Generate decode step: the whole model (every layer) for a batch of sessions. */
  modelStepSeconds: Histogram;
  /** Prompt tokens run through the served model's prefill. */
  prefillTokens: Counter;
  /** One Generate prefill chunk: the whole model for one session's chunk. */
  prefillChunkSeconds: Histogram;
  /** 1 once the served model is loaded. */
  modelReady: Gauge;
  /** How long loading the served model took. */
  modelLoadSeconds: Gauge;
  /** Session-owner records that could not be written, removed or read (FREEKV_SESSION_OWNERS). */
  ownerFailures: Counter;
  /** CommitPages calls to the kvstore that failed (the session is degraded until a retry succeeds). */
  commitFailures: Counter;
  releaseFailures: Counter;
  /** Sessions found lost: the kvstore no longer held them (SessionManager.markLost). */
  sessionsLost: Counter;
  /** Sessions closed for being idle (FREEKV_SESSION_IDLE_TIMEOUT_S). */
  sessionsExpired: Counter;
  /** Sessions marked diverged by this process's decodes and Generate model calls: a failed one may have appended to them (sessions/diverged.ts); a re-attach that restores a saved mark does not count. */
  sessionsDiverged: Counter;
  /** Failures of the engine's background work that no call was answered with (engine.takeBackgroundFailures). */
  engineBackgroundFailures: Counter;
  /** Open sessions marked diverged, re-attached ones included (read from the open sessions at scrape time: closing one takes it off). */
  divergedSessions: Gauge;
}

export interface ComputeContext {
  config: ComputeConfig;
  log: Logger;
  metrics: ComputeMetrics;
  kvstore: KvStoreClient;
  sessions: SessionManager;
  /** The FreeKV engine of FREEKV_BACKEND. */
  engine: Engine;
  backend: "cpu" | "cuda";
  /** The model Generate serves (FREEKV_MODEL, the built-in one by default). */
  served: ServedModel;
  /** How compute reaches its kvstore (TLS by FREEKV_KVSTORE_TLS_*; plaintext otherwise). */
  kvstoreCredentials: ChannelCredentials;
  /** Per-tenant bearer tokens (FREEKV_AUTH_TOKENS_FILE); undefined: no authentication. */
  auth?: TenantAuth;
  /** Session owners across pods (FREEKV_SESSION_OWNERS), once connected at start. */
  owners?: SessionOwners;
  /** Generate's request queue: running slots and memory (FREEKV_QUEUE_MAX_REQUESTS, FREEKV_MAX_RUNNING_REQUESTS). */
  admission: AdmissionQueue;
  /** KV storage type of model sessions (the backend's). */
  kvDtype: DType;
  /** The Attention streams' tensor exchanges, counted against FREEKV_EXCHANGE_CAPACITY_BYTES. */
  exchanges: ExchangeBudget;
}

export class StartupError extends Error {}

/** Creates the engine for FREEKV_BACKEND. */
export function createEngine(config: ComputeConfig): Engine {
  const addon = loadAddon();
  if (config.FREEKV_BACKEND === "cuda") {
    const info = addon.backendInfo();
    if (!info.backends.includes("cuda")) {
      throw new StartupError(`FREEKV_BACKEND=cuda: ${info.cudaBuilt ? (info.cuda.reason ?? "no CUDA device") : "this addon was built without CUDA (no nvcc at build time)"}`);
    }
  }
  try {
    return new addon.Engine({
      backend: config.FREEKV_BACKEND,
      threads: config.FREEKV_THREADS || undefined,
      device: config.FREEKV_CUDA_DEVICE,
      cudaGraphs: config.FREEKV_CUDA_GRAPH,
      sideTiming: config.FREEKV_SIDE_TIMING,
      prefillContextBytes: config.FREEKV_PREFILL_CONTEXT_BYTES,
      hierarchicalSelection: config.FREEKV_HIERARCHICAL_SELECTION,
    });
  } catch (e) {
    throw new StartupError(`FREEKV_BACKEND=${config.FREEKV_BACKEND}: cannot create the engine: ${(e as Error).message}`);
  }
}

function createMetrics(registry: Registry, sessions: () => SessionManager | undefined, exchanges: () => ExchangeBudget | undefined): ComputeMetrics {
  new Gauge({
    name: "freekv_compute_exchange_bytes",
    help: "Bytes of the Attention streams' shared-memory tensor exchanges now open in this process",
    registers: [registry],
    collect() {
      this.set(exchanges()?.bytesInUse ?? 0);
    },
  });
  new Gauge({
    name: "freekv_compute_exchange_capacity_bytes",
    help: "FREEKV_EXCHANGE_CAPACITY_BYTES: the most the tensor exchanges of this process may hold together",
    registers: [registry],
    collect() {
      this.set(exchanges()?.capacity ?? 0);
    },
  });
  new Gauge({
    name: "freekv_compute_releases_pending",
    help: "Sessions given up here whose release at the kvstore failed and is being retried (their memory is still counted there)",
    registers: [registry],
    collect() {
      this.set(sessions()?.releasesPending ?? 0);
    },
  });
  const m: ComputeMetrics = {
    registry,
    sessions: new Gauge({ name: "freekv_compute_sessions", help: "Open sessions", registers: [registry] }),
    degradedSessions: new Gauge({
      name: "freekv_compute_degraded_sessions",
      help: "Open sessions whose latest commit to the kvstore failed (their pages are retried; calls that append to them get UNAVAILABLE until a retry succeeds), or that the kvstore lost (DATA_LOSS until closed; their memory is already freed)",
      registers: [registry],
      collect() {
        const m = sessions();
        this.set(m ? m.list().filter((s) => s.commitError !== undefined || s.lost !== undefined).length : 0);
      },
    }),
    attentionRequests: new Counter({ name: "freekv_compute_attention_requests_total", help: "Attention stream messages served", labelNames: ["op"], registers: [registry] }),
    attentionSeconds: new Histogram({
      name: "freekv_compute_attention_seconds",
      help: "Attention message latency (validation, batching wait, engine)",
      labelNames: ["op"],
      buckets: [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1, 3],
      registers: [registry],
    }),
    decodeBatchSize: new Histogram({ name: "freekv_compute_decode_batch_size", help: "Attention stream: sessions per batched engine decode call of one layer", buckets: [1, 2, 4, 8, 16, 32, 64], registers: [registry] }),
    modelStepBatchSize: new Histogram({ name: "freekv_compute_model_step_batch_size", help: "Generate: sessions per batched decode step of the whole model", buckets: [1, 2, 4, 8, 16, 32, 64], registers: [registry] }),
    decodeLayerSeconds: new Histogram({
      name: "freekv_compute_decode_layer_seconds",
      help: "Attention stream: engine decode call time of one layer for a batch",
      buckets: [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1],
      registers: [registry],
    }),
    modelStepSeconds: new Histogram({
      name: "freekv_compute_model_step_seconds",
      help: "Generate: native decode step time of the whole model (every layer) for a batch",
      buckets: [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1],
      registers: [registry],
    }),
    prefillTokens: new Counter({ name: "freekv_compute_prefill_tokens_total", help: "Generate: prompt tokens run through the model's prefill", registers: [registry] }),
    prefillChunkSeconds: new Histogram({
      name: "freekv_compute_prefill_chunk_seconds",
      help: "Generate: native prefill time of one prompt chunk (every layer), FREEKV_PREFILL_CHUNK_TOKENS tokens at most",
      buckets: [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1, 3, 10],
      registers: [registry],
    }),
    modelReady: new Gauge({ name: "freekv_compute_model_ready", help: "1 once the served model is loaded and Generate serves it", registers: [registry] }),
    modelLoadSeconds: new Gauge({ name: "freekv_compute_model_load_seconds", help: "How long loading the served model took at start", registers: [registry] }),
    ownerFailures: new Counter({ name: "freekv_compute_session_owner_failures_total", help: "Session-owner records (FREEKV_SESSION_OWNERS) that could not be written, removed or read", registers: [registry] }),
    sessionsExpired: new Counter({
      name: "freekv_compute_sessions_expired_total",
      help: "Sessions closed because no call used them for FREEKV_SESSION_IDLE_TIMEOUT_S",
      registers: [registry],
    }),
    sessionsDiverged: new Counter({
      name: "freekv_compute_sessions_diverged_total",
      help: "Sessions a failed Attention decode or Generate model call in this process may have appended to (their context is no longer known): their calls get DATA_LOSS until closed. Sessions re-attached already diverged are not counted again",
      registers: [registry],
    }),
    engineBackgroundFailures: new Counter({
      name: "freekv_compute_engine_background_failures_total",
      help: "Failures of the engine's background work that no call was answered with (a registration of a prompt's host store ahead of its chunks, a speculative recall of a session that closed); each is logged at warn",
      registers: [registry],
    }),
    divergedSessions: new Gauge({
      name: "freekv_compute_sessions_diverged",
      help: "Open sessions whose context a failed Attention decode left unknown, those re-attached with a saved mark included (calls get DATA_LOSS until closed; GetSession's data_loss says why)",
      registers: [registry],
      collect() {
        const m = sessions();
        this.set(m ? m.list().filter((s) => !s.closed && divergedError(s) !== undefined).length : 0);
      },
    }),
    sessionsLost: new Counter({
      name: "freekv_compute_sessions_lost_total",
      help: "Open sessions the kvstore no longer held (it restarted without a persistent directory): their calls get DATA_LOSS until closed",
      registers: [registry],
    }),
    releaseFailures: new Counter({
      name: "freekv_compute_release_failures_total",
      help: "Releases of a session at the kvstore that failed or got no answer (each is retried in the background until the kvstore answers)",
      registers: [registry],
    }),
    commitFailures: new Counter({ name: "freekv_compute_commit_failures_total", help: "Page and metadata commits to the kvstore that failed (retried; the session is degraded meanwhile)", registers: [registry] }),
  };
  // Retrieval counters summed over open sessions, read from the engine at scrape time.
  const sum = (pick: (s: ReturnType<SessionManager["stats"]>) => number) => {
    const mgr = sessions();
    if (!mgr) return 0;
    // A lost session's engine session is freed: it has no statistics any more.
    return mgr.list().reduce((a, s) => (s.detached ? a : a + pick(mgr.stats(s))), 0);
  };
  new Gauge({
    name: "freekv_compute_recall_bytes",
    help: "Bytes recalled from the host tier by open sessions",
    registers: [registry],
    collect() {
      this.set(sum((s) => s.recallBytes));
    },
  });
  new Gauge({
    name: "freekv_compute_correction_rate",
    help: "Corrected selections / selections over open sessions",
    registers: [registry],
    collect() {
      const sel = sum((s) => s.selections);
      this.set(sel ? sum((s) => s.corrections) / sel : 0);
    },
  });
  new Gauge({
    name: "freekv_compute_hit_rate",
    help: "Selected pages already resident / selected pages over open sessions",
    registers: [registry],
    collect() {
      const sel = sum((s) => s.pagesSelected);
      this.set(sel ? sum((s) => s.pagesHit) / sel : 0);
    },
  });
  // Adjacent-query cosine (the correction's group cosine), model-wide: per-layer series would be
  // layers x buckets of them; the per-layer figures are in RetrievalStats.layers.
  new Gauge({
    name: "freekv_compute_adjacent_cosine_mean",
    help: "Mean adjacent-query group cosine cos(q_t, q_t-1) over open sessions, all layers and KV heads",
    registers: [registry],
    collect() {
      const n = sum((s) => s.layers.reduce((a, l) => a + l.cosineSamples, 0));
      this.set(n ? sum((s) => s.layers.reduce((a, l) => a + l.cosineSum, 0)) / n : 0);
    },
  });
  new Gauge({
    name: "freekv_compute_adjacent_cosine_samples",
    help: "Adjacent-query group cosine samples of open sessions (all layers and KV heads) below each bucket edge (cumulative; below=\"+Inf\": all)",
    labelNames: ["below"],
    registers: [registry],
    collect() {
      this.reset();
      const mgr = sessions();
      let edges: number[] = [];
      let counts: number[] = [];
      for (const s of mgr?.list() ?? []) {
        if (s.detached) continue;
        const st = mgr!.stats(s);
        edges = st.cosineBucketEdges;
        for (const l of st.layers) l.cosineHistogram.forEach((c, i) => (counts[i] = (counts[i] ?? 0) + c));
      }
      if (!edges.length) return;
      let cum = 0;
      edges.forEach((e, i) => {
        cum += counts[i] ?? 0;
        this.set({ below: String(Number(e.toPrecision(6))) }, cum);
      });
      this.set({ below: "+Inf" }, cum + (counts[edges.length] ?? 0));
    },
  });
  new Gauge({
    name: "freekv_compute_pages",
    help: "Pages of open sessions per tier (device = resident in the budget cache, host = offloaded to the kvstore)",
    labelNames: ["tier"],
    registers: [registry],
    collect() {
      const mgr = sessions();
      let device = 0;
      let host = 0;
      for (const s of mgr?.list() ?? []) {
        if (s.detached) continue;
        const st = mgr!.engine.stats(s.engineSession);
        device += st.residentPages;
        host += st.pagesOffloaded;
      }
      this.set({ tier: "device" }, device);
      this.set({ tier: "host" }, host);
    },
  });
  return m;
}

export function createContext(config: ComputeConfig, log: Logger, registry: Registry): ComputeContext {
  const exchangeCapacity = config.FREEKV_EXCHANGE_CAPACITY_BYTES ?? defaultExchangeCapacity();
  const shm = shmSpace();
  if (shm && exchangeCapacity > shm.total) {
    throw new StartupError(`FREEKV_EXCHANGE_CAPACITY_BYTES=${exchangeCapacity} is more than /dev/shm holds (${shm.total} bytes)`);
  }
  const exchanges = new ExchangeBudget(exchangeCapacity);
  const engine = createEngine(config);
  let kvstoreCredentials: ChannelCredentials;
  try {
    kvstoreCredentials = channelCredentials("FREEKV_KVSTORE", { ca: config.FREEKV_KVSTORE_TLS_CA_FILE, cert: config.FREEKV_KVSTORE_TLS_CLIENT_CERT_FILE, key: config.FREEKV_KVSTORE_TLS_CLIENT_KEY_FILE });
  } catch (e) {
    throw new StartupError((e as Error).message);
  }
  const kvstore = new KvStoreClient(config.FREEKV_KVSTORE_ADDR, config.FREEKV_KVSTORE_TIMEOUT_MS, kvstoreCredentials);
  let mgr: SessionManager | undefined;
  const metrics = createMetrics(registry, () => mgr, () => exchanges);
  // After every model call (the background work a prompt's chunks start ends by the next one) and
  // every session close: logged and counted, never left in the engine.
  const reportBackgroundFailures = (closed?: { id: string; engineSession: number }): void => {
    const { failures, dropped } = engine.takeBackgroundFailures();
    for (const f of failures) {
      metrics.engineBackgroundFailures.inc();
      const session = closed && f.session === closed.engineSession ? closed.id : undefined;
      log.warn({ session, engineSession: f.session, err: f.message }, "background work of the engine failed");
    }
    if (dropped > 0) {
      metrics.engineBackgroundFailures.inc(dropped);
      log.warn({ failures: dropped }, "background work of the engine failed more times than the engine keeps: these were counted, not kept");
    }
  };
  const served = new ServedModel(
    {
      log,
      scheduler: (model) =>
        new ModelScheduler(model, {
          prefillChunkTokens: config.FREEKV_PREFILL_CHUNK_TOKENS ?? defaultPrefillChunkTokens(config.FREEKV_BACKEND),
          prefillSlice: config.FREEKV_PREFILL_SLICE,
          prefillOrder: config.FREEKV_PREFILL_ORDER,
          prefillUnpaidSlices: config.FREEKV_PREFILL_UNPAID_SLICES,
          onStep(size, ms) {
            metrics.modelStepBatchSize.observe(size);
            metrics.modelStepSeconds.observe(ms / 1000);
            reportBackgroundFailures();
          },
          onPrefill(tokens, ms, chunk) {
            reportBackgroundFailures();
            metrics.prefillTokens.inc(tokens);
            metrics.prefillChunkSeconds.observe(ms / 1000);
            // gapMs: the time since the previous model call ended (it counts time with nothing queued too);
            // between two chunks of a prompt read alone, Generate's own overhead.
            log.debug({ engineSession: chunk.session, start: chunk.start, tokens, ms: Math.round(ms * 100) / 100, gapMs: chunk.gapMs === undefined ? undefined : Math.round(chunk.gapMs * 100) / 100 }, "prefill chunk");
          },
        }),
      onLoad(seconds) {
        metrics.modelReady.set(seconds === undefined ? 0 : 1);
        if (seconds !== undefined) metrics.modelLoadSeconds.set(seconds);
      },
    },
    config.FREEKV_MODEL === NO_MODEL,
  );
  const admission = new AdmissionQueue({ maxWaiting: config.FREEKV_QUEUE_MAX_REQUESTS, maxRunning: config.FREEKV_MAX_RUNNING_REQUESTS, retryMs: config.FREEKV_QUEUE_RETRY_MS, backfillMs: config.FREEKV_QUEUE_BACKFILL_MS, maxAttempts: config.FREEKV_QUEUE_ATTEMPTS });
  // The CUDA backend stores K/V in bf16; the CPU backend in float32 by default.
  const kvDtype = config.FREEKV_BACKEND === "cuda" ? DType.D_TYPE_BFLOAT16 : DType.D_TYPE_FLOAT32;
  let auth: TenantAuth | undefined;
  try {
    auth = config.FREEKV_AUTH_TOKENS_FILE ? TenantAuth.fromFile(config.FREEKV_AUTH_TOKENS_FILE) : undefined;
  } catch (e) {
    throw new StartupError((e as Error).message);
  }
  const ctx: ComputeContext = {
    auth,
    kvstoreCredentials,
    admission,
    exchanges,
    kvDtype,
    config,
    log,
    metrics,
    kvstore,
    engine,
    backend: config.FREEKV_BACKEND,
    served,
    sessions: undefined as unknown as SessionManager,
  };
  mgr = new SessionManager({
    log,
    kvstore,
    engine,
    defaultMaxContextTokens: config.FREEKV_MAX_CONTEXT_TOKENS,
    maxContextLimit: config.FREEKV_MAX_CONTEXT_LIMIT,
    commitChecksums: config.FREEKV_COMMIT_CHECKSUMS,
    modelGeometry: () => served.geometry(),
    backend: config.FREEKV_BACKEND,
    defaultKvDtype: kvDtype,
    onEngineClosed: (s) => reportBackgroundFailures(s),
    onChange: (n) => {
      metrics.sessions.set(n);
      // A closed session may have freed what a waiting request needs.
      admission.poke();
    },
    onCommitFailure: () => metrics.commitFailures.inc(),
    onLost: () => metrics.sessionsLost.inc(),
    onReleaseFailure: () => metrics.releaseFailures.inc(),
    onExpired: (id) => {
      metrics.sessionsExpired.inc();
      // No longer held here: other pods stop redirecting to this one for it.
      void ctx.owners?.release(id);
    },
    maxSessionsPerTenant: config.FREEKV_MAX_SESSIONS_PER_TENANT,
    idleTimeoutMs: config.FREEKV_SESSION_IDLE_TIMEOUT_S * 1000,
  });
  ctx.sessions = mgr;
  return ctx;
}

/**
 * Loads the served model (FREEKV_MODEL, or the built-in one) off the event loop; at start, once
 * the server listens. `load` replaces the loading itself (tests). Resolves with whether it is ready.
 */
export function loadServedModel(ctx: ComputeContext, load?: (dir: string) => Promise<LoadedModel>): Promise<boolean> {
  if (ctx.served.state === "none") return Promise.resolve(true);
  const dir = ctx.config.FREEKV_MODEL || builtinModelDir();
  const options = { engine: ctx.engine, threads: ctx.config.FREEKV_THREADS || undefined, deviceWeights: ctx.config.FREEKV_DEVICE_WEIGHTS };
  return ctx.served.load(dir, () => (load ? load(dir) : loadModelAsync(dir, options)));
}
