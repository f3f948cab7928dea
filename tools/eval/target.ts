/**
 * Where `freekv eval` sends its requests: the compute service's Generate, either of two tiers
 * started here as child processes (kvstore, then compute serving the model folder, as `npm start`
 * does) or of a compute service already running at HOST:PORT.
 *
 * One task in one retrieval mode is one model session: CreateSession (the mode and budget, and a
 * context sized to the prompt plus max_tokens), one greedy Generate on it, CloseSession. The
 * prompt is tokenized here with the model folder's tokenizer exactly as Generate tokenizes a raw
 * text prompt for a fresh session (with the BOS of the tokenizer's post-processor), or rendered
 * through the chat template for a task marked `chat`.
 */
import { credentials, Metadata, type ServiceError } from "@grpc/grpc-js";
import type { RetrievalConfig, RetrievalStats } from "../../proto/gen/freekv/v1/common.js";
import {
  ComputeServiceClient,
  CloseSessionRequest,
  CreateSessionRequest,
  FinishReason,
  finishReasonToJSON,
  GenerateRequest,
  SessionKind,
  type GenerateResponse,
  type Session,
} from "../../proto/gen/freekv/v1/compute.js";
import { startTiers, type Tiers } from "../dev/launch.js";

export interface GenerateOutcome {
  text: string;
  tokens: number[];
  finishReason: string;
  promptTokens: number;
  completionTokens: number;
  prefillMs: number;
  decodeMs: number;
  stats?: RetrievalStats;
  /** The session as the service made it (resolved retrieval config, geometry, backend). */
  session?: Session;
}

export interface InProcessOptions {
  modelDir: string;
  backend: "cpu" | "cuda";
  threads?: number;
  /** Echo the services' logs to stderr. */
  echo?: boolean;
}

export class EvalTarget {
  /** The last session the service made, and per retrieval mode (its number) the first one: their resolved settings. */
  lastSession?: Session;
  readonly sessionsByMode = new Map<number, Session>();

  private constructor(
    readonly address: string,
    private readonly client: ComputeServiceClient,
    private readonly tiers?: Tiers,
  ) {}

  /** Starts kvstore and compute (serving `modelDir` on `backend`) on ephemeral ports. */
  static async start(o: InProcessOptions): Promise<EvalTarget> {
    const quiet = o.echo ? {} : { FREEKV_LOG_LEVEL: "warn" };
    const tiers = await startTiers({
      kvstoreEnv: { ...quiet },
      computeEnv: {
        ...quiet,
        FREEKV_MODEL: o.modelDir,
        FREEKV_BACKEND: o.backend,
        ...(o.threads ? { FREEKV_THREADS: String(o.threads) } : {}),
      },
      echo: o.echo,
      // A large checkpoint takes a while to map before compute listens.
      timeoutMs: 600_000,
    });
    return new EvalTarget(tiers.compute.address, newClient(tiers.compute.address), tiers);
  }

  /** A compute service already running at `address` (HOST:PORT). */
  static connect(address: string): EvalTarget {
    return new EvalTarget(address, newClient(address));
  }

  get inProcess(): boolean {
    return !!this.tiers;
  }

  /**
   * Greedy generation of `maxTokens` at most from `prompt` (token ids) in a fresh session with
   * `retrieval`. The session is closed afterwards, also when the generation fails.
   */
  async generate(prompt: number[], maxTokens: number, retrieval: Partial<RetrievalConfig>): Promise<GenerateOutcome> {
    const created = await unary<CreateSessionRequest, { session?: Session }>(
      (req, cb) => this.client.createSession(req, cb),
      CreateSessionRequest.fromPartial({ kind: SessionKind.SESSION_KIND_MODEL, retrieval, maxContextTokens: prompt.length + maxTokens }),
    );
    const session = created.session!;
    this.lastSession = session;
    if (session.retrieval && !this.sessionsByMode.has(session.retrieval.mode)) this.sessionsByMode.set(session.retrieval.mode, session);
    try {
      const req = GenerateRequest.fromPartial({
        sessionId: session.sessionId,
        prompt: { $case: "tokens", value: { ids: prompt } },
        maxTokens,
        sampling: { temperature: 0 },
      });
      const out: GenerateOutcome = { text: "", tokens: [], finishReason: "unspecified", promptTokens: prompt.length, completionTokens: 0, prefillMs: 0, decodeMs: 0, session };
      await new Promise<void>((resolve, reject) => {
        const call = this.client.generate(req, new Metadata());
        call.on("data", (m: GenerateResponse) => {
          const e = m.event;
          if (e?.$case === "chunk") {
            out.tokens.push(...e.value.tokenIds);
            out.text += e.value.text;
          } else if (e?.$case === "final") {
            const f = e.value;
            out.finishReason = f.finishReason === FinishReason.FINISH_REASON_UNSPECIFIED ? "unspecified" : finishReasonToJSON(f.finishReason).replace(/^FINISH_REASON_/, "").toLowerCase();
            out.promptTokens = f.usage?.promptTokens ?? prompt.length;
            out.completionTokens = f.usage?.completionTokens ?? out.tokens.length;
            out.prefillMs = f.usage?.prefillMs ?? 0;
            out.decodeMs = f.usage?.decodeMs ?? 0;
            out.stats = f.stats;
          }
        });
        call.on("error", reject);
        call.on("end", resolve);
      });
      return out;
    } finally {
      await unary<CloseSessionRequest, unknown>((req, cb) => this.client.closeSession(req, cb), CloseSessionRequest.fromPartial({ sessionId: session.sessionId })).catch(() => {});
    }
  }

  /** Closes the channel and, for tiers started here, stops them (compute first). */
  async close(): Promise<void> {
    this.client.close();
    await this.tiers?.stop();
  }
}

const newClient = (address: string) => new ComputeServiceClient(address, credentials.createInsecure(), { "grpc.max_receive_message_length": 64 << 20, "grpc.max_send_message_length": 64 << 20 });

function unary<Req, Res>(fn: (req: Req, cb: (err: ServiceError | null, res: Res) => void) => unknown, req: Req): Promise<Res> {
  return new Promise((resolve, reject) => {
    fn(req, (err, res) => (err ? reject(err) : resolve(res)));
  });
}
