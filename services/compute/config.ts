/** The compute service's environment variables (see the README's configuration table). */
import { z } from "zod";
import { flag, host, hostPort, hostPortList, intInRange, logLevel, mallocMmapThreshold, nativeFlag, nonNegativeInt, numberInRange, optionalIntInRange, optionalPort, optionalPositiveInt, port, positiveInt, seconds, serviceSchema, writeStallMs } from "../common/config.js";
import { PREFILL_CHUNK_TOKENS, PREFILL_SLICE, PREFILL_UNPAID_SLICES } from "./generate/scheduler.js";
// The kvstore's variables are known here too (a pod's two containers may share one ConfigMap):
// its schema declares them (serviceSchema) when its module loads.
import "../kvstore/config.js";

export const computeConfigSchema = z.object({
  FREEKV_COMPUTE_HOST: host("127.0.0.1"),
  FREEKV_COMPUTE_PORT: port(50051),
  FREEKV_COMPUTE_METRICS_PORT: port(9091),
  /** Address of the metrics (and /livez) HTTP server; unset: FREEKV_COMPUTE_HOST. */
  FREEKV_COMPUTE_METRICS_HOST: z.string().min(1).optional(),
  /** host:port of the kvstore's gRPC server ([v6 address]:port for IPv6). */
  FREEKV_KVSTORE_ADDR: hostPort().default("127.0.0.1:50052"),
  FREEKV_BACKEND: z.enum(["cpu", "cuda"], { message: 'must be "cpu" or "cuda"' }).default("cpu"),
  /** CPU worker threads of the engine; 0 = all cores. */
  FREEKV_THREADS: nonNegativeInt(0),
  FREEKV_CUDA_DEVICE: nonNegativeInt(0),
  /** FREEKV_BACKEND=cuda: the GPU model runner's decode steps become CUDA graphs (off: every op issued directly). */
  FREEKV_CUDA_GRAPH: flag(true),
  /** FREEKV_BACKEND=cuda, a diagnostic: time each graphed step's side-stream work (the host waits for it before the next step). */
  FREEKV_SIDE_TIMING: flag(false),
  // Read by the addon itself (getenv); validated here so that a bad value fails at start.
  /** FREEKV_BACKEND=cuda, a diagnostic: per-part device times of every prefill call on stderr. */
  FREEKV_PREFILL_PROFILE: nativeFlag(),
  /** FREEKV_BACKEND=cuda: time cuBLASLt's candidate algorithms once per prefill GEMM shape. */
  FREEKV_GEMM_AUTOTUNE: nativeFlag(),
  /** The speculative selection takes the selection of the groups the step's correction just selected with the same query (engine/Retrieval.h; both backends). */
  FREEKV_SPEC_REUSE: nativeFlag(true),
  /** FREEKV_BACKEND=cuda: the mean combine scores a KV group's query heads folded into two rows (engine/Retrieval.h, cuda/selection.cuh). */
  FREEKV_MEAN_FOLD: nativeFlag(true),
  /** Both backends: the pages a KV group keeps on the device, in selections (engine/Retrieval.h, engine/ResidentPool.h); read when a session is made. */
  FREEKV_RESIDENT_FACTOR: intInRange(4, 1, 8),
  /**
   * FREEKV_BACKEND=cuda: threads that commit and pin a session's host store as it grows. Decimal
   * digits 1..64, the addon's own reading (CudaSession.cu), which otherwise throws at the first
   * CUDA session instead of at start.
   */
  FREEKV_REGISTER_THREADS: intInRange(8, 1, 64),
  // Read by the addon (CudaEngine.cu, CudaSession.cu); an empty value is the default there too.
  FREEKV_PREFILL_OFFLOAD: z.enum(["copy", "kernel"], { message: 'must be "copy" or "kernel"' }).default("copy"),
  FREEKV_REGISTER_AHEAD: z.enum(["thread", "inline"], { message: 'must be "thread" or "inline"' }).default("thread"),
  /** FREEKV_BACKEND=cuda, bf16 weights: the output type of a prefill's gate/up GEMM (forward_cuda.cu). */
  FREEKV_PREFILL_GATE_UP: z.enum(["bf16", "f32"], { message: 'must be "bf16" or "f32"' }).default("bf16"),
  FREEKV_MALLOC_MMAP_THRESHOLD: mallocMmapThreshold(),
  /** FREEKV_BACKEND=cuda: where the prompts' resident contexts come from (CudaEngine.cu): cudaMalloc, or a memory pool that keeps freed memory for the next prompt. */
  FREEKV_PREFILL_CONTEXT_MEMORY: z.enum(["malloc", "pool"], { message: 'must be "malloc" or "pool"' }).default("malloc"),
  /** FREEKV_BACKEND=cuda: where a session's device arrays come from (CudaEngine.cu): cudaMalloc / cudaFree per array (each a device-wide synchronisation), or a stream-ordered pool. */
  FREEKV_SESSION_DEVICE_MEMORY: z.enum(["malloc", "pool"], { message: 'must be "malloc" or "pool"' }).default("malloc"),
  /**
   * How long, in ms, a closed session's teardown in this process (the unmap of its segments, the
   * unregistration of its host store) may wait in all, between its 64 MiB pieces, while another
   * session is being opened or its store committed and pinned (native/src/shm/TeardownGate.h);
   * 0 never waits. Decimal 0..60000, the addon's own reading.
   */
  FREEKV_TEARDOWN_YIELD_MS: intInRange(0, 0, 60000),
  /** FREEKV_BACKEND=cuda: device memory the prompts being prefilled keep resident (each layer's whole context between chunks); 0 = a quarter of the device. */
  FREEKV_PREFILL_CONTEXT_BYTES: nonNegativeInt(0),
  /** Page selection through the hierarchical page summaries (the engine option hierarchicalSelection). */
  FREEKV_HIERARCHICAL_SELECTION: z.enum(["auto", "on", "off"], { message: 'must be "auto", "on" or "off"' }).default("auto"),
  /** Weight type of the GPU model runner (FREEKV_BACKEND=cuda): auto = bf16 unless the checkpoint is all F32. */
  FREEKV_DEVICE_WEIGHTS: z.enum(["auto", "bf16", "f32"], { message: 'must be "auto", "bf16" or "f32"' }).default("auto"),
  /** How long a Generate or Attention stream waits for a client that stopped reading before it ends the call (DEADLINE_EXCEEDED); 0: no limit. */
  FREEKV_WRITE_STALL_MS: writeStallMs(),
  /** Default max context of a session when the request leaves it 0. */
  FREEKV_MAX_CONTEXT_TOKENS: positiveInt(32768),
  /** Upper bound a request may ask for. */
  FREEKV_MAX_CONTEXT_LIMIT: positiveInt(1 << 20),
  /** How long decode requests for one layer are collected into one engine call, in microseconds. */
  FREEKV_DECODE_BATCH_WINDOW_US: nonNegativeInt(200),
  /** Send a CRC32C (computed natively) of every committed page for the kvstore to verify against shared memory. */
  FREEKV_COMMIT_CHECKSUMS: flag(true),
  /** Prompt tokens per prefill chunk of Generate; decode steps of other sessions run between two chunks. Unset: the backend's default (defaultPrefillChunkTokens). */
  FREEKV_PREFILL_CHUNK_TOKENS: optionalIntInRange(PREFILL_CHUNK_TOKENS.min, PREFILL_CHUNK_TOKENS.max),
  /** While sessions decode, a prefill chunk's predicted time at most this times the recent decode step (0: whole chunks always). */
  FREEKV_PREFILL_SLICE: numberInRange(PREFILL_SLICE.default, PREFILL_SLICE.min, PREFILL_SLICE.max),
  /** Slices of sliced chunks' time that may be unpaid by decode steps when the next sliced chunk starts. */
  FREEKV_PREFILL_UNPAID_SLICES: numberInRange(PREFILL_UNPAID_SLICES.default, PREFILL_UNPAID_SLICES.min, PREFILL_UNPAID_SLICES.max),
  /** The order of several prompts' prefill chunks (ModelScheduler): arrival, or turns. */
  FREEKV_PREFILL_ORDER: z.enum(["arrival", "turns"], { message: 'must be "arrival" or "turns"' }).default("turns"),
  /** Generate requests that may wait for a running slot or memory; one more is refused (RESOURCE_EXHAUSTED). */
  FREEKV_QUEUE_MAX_REQUESTS: nonNegativeInt(1024),
  /** Generate requests running at once (prefilling or decoding; 0: no limit); the rest wait in the queue. */
  FREEKV_MAX_RUNNING_REQUESTS: nonNegativeInt(64),
  /** How often a request waiting for memory tries again when no request here finished, in ms. */
  FREEKV_QUEUE_RETRY_MS: positiveInt(250),
  FREEKV_QUEUE_BACKFILL_MS: nonNegativeInt(2000),
  /** Admission attempts (a new session's kvstore reservation and host store set-up) in flight at once. */
  FREEKV_QUEUE_ATTEMPTS: intInRange(4, 1, 64),
  /** Hugging Face model folder served by Generate; unset: the built-in model; "none": no model (attention sessions only). */
  FREEKV_MODEL: z.string().optional(),
  /** JSON file of per-tenant token hashes ({"tenant": "sha256 hex"}): every call needs its bearer token (auth.ts); unset: no authentication. */
  FREEKV_AUTH_TOKENS_FILE: z.string().min(1).optional(),
  /** redis:// URL of the session owners shared by the pods (sessions/owners.ts); unset: no redirects. */
  FREEKV_SESSION_OWNERS: z
    .string()
    .regex(/^rediss?:\/\/.+$/, "must be a redis:// URL")
    .optional(),
  FREEKV_SESSION_OWNERS_PREFIX: z.string().min(1).default("freekv:"),
  /** host:port at which other pods and clients reach this compute (required with FREEKV_SESSION_OWNERS; [v6 address]:port for IPv6). */
  FREEKV_ADVERTISE_ADDRESS: hostPort().optional(),
  /** Name the OpenAI-compatible front serves the model under; unset: the model folder's name. */
  FREEKV_MODEL_NAME: z.string().regex(/^\S+$/, "must be a name without spaces").optional(),
  /** Port of the OpenAI-compatible HTTP front (/v1/completions, /v1/chat/completions); unset: off, 0: ephemeral. */
  FREEKV_OPENAI_PORT: optionalPort(),
  /** Its listen address; unset: FREEKV_COMPUTE_HOST. */
  FREEKV_OPENAI_HOST: z.string().min(1).optional(),
  /** Largest request body the front reads (bytes); a larger one is refused (413) before it is parsed. */
  FREEKV_OPENAI_MAX_BODY_BYTES: intInRange(8 << 20, 1024, 1 << 30),
  /** Bytes of Attention tensor exchanges this process may hold at once; unset: 1/8 of /dev/shm's size. */
  FREEKV_EXCHANGE_CAPACITY_BYTES: optionalPositiveInt(),
  /** Sessions no call used for this many seconds are closed and their memory released; 0: never. */
  FREEKV_SESSION_IDLE_TIMEOUT_S: seconds(0, 31_536_000, "a year"),
  /** Open sessions one tenant (x-freekv-tenant) may have from CreateSession; 0: no limit. */
  FREEKV_MAX_SESSIONS_PER_TENANT: nonNegativeInt(0),
  FREEKV_KVSTORE_TIMEOUT_MS: positiveInt(10_000),
  /** TLS of compute's gRPC server (common/tls.ts): certificate and key files; with a client CA, mutual TLS. */
  FREEKV_COMPUTE_TLS_CERT_FILE: z.string().min(1).optional(),
  FREEKV_COMPUTE_TLS_KEY_FILE: z.string().min(1).optional(),
  FREEKV_COMPUTE_TLS_CLIENT_CA_FILE: z.string().min(1).optional(),
  /** TLS to the kvstore: the CA its certificate is checked against, and compute's client certificate for mutual TLS. */
  FREEKV_KVSTORE_TLS_CA_FILE: z.string().min(1).optional(),
  FREEKV_KVSTORE_TLS_CLIENT_CERT_FILE: z.string().min(1).optional(),
  FREEKV_KVSTORE_TLS_CLIENT_KEY_FILE: z.string().min(1).optional(),
  FREEKV_SHUTDOWN_GRACE_MS: positiveInt(10_000),
  /** Where a draining compute moves its named sessions (sessions/handoff.ts): host:port[,host:port...], or "owners" (the live pods of FREEKV_SESSION_OWNERS); unset: nowhere, they stay in this pod's kvstore. */
  FREEKV_DRAIN_HANDOFF: hostPortList("owners").optional(),
  /** How long the drain's hand-off may take in all, after the in-flight calls ended (ms). */
  FREEKV_DRAIN_HANDOFF_TIMEOUT_MS: positiveInt(30_000),
  /** Deadline of a MoveSession whose caller set none (ms). */
  FREEKV_MOVE_TIMEOUT_MS: positiveInt(120_000),
  /** With FREEKV_AUTH_TOKENS_FILE: the tenant whose token may move (and receive) any tenant's sessions, the pods' own identity for hand-offs; unset: a tenant moves only its own sessions. */
  FREEKV_MOVE_ADMIN_TENANT: z.string().min(1).optional(),
  /** File holding the bearer token this compute presents to other computes when it hands sessions off (a drain); unset: none. */
  FREEKV_PEER_TOKEN_FILE: z.string().min(1).optional(),
  /** TLS to other computes (moves): the CA their certificates are checked against, and this compute's client certificate for mutual TLS. */
  FREEKV_PEER_TLS_CA_FILE: z.string().min(1).optional(),
  FREEKV_PEER_TLS_CLIENT_CERT_FILE: z.string().min(1).optional(),
  FREEKV_PEER_TLS_CLIENT_KEY_FILE: z.string().min(1).optional(),
  FREEKV_LOG_LEVEL: logLevel(),
});
// Known to both services' check for misspelt variable names.
serviceSchema(computeConfigSchema);

export type ComputeConfig = z.infer<typeof computeConfigSchema>;
