/**
 * @freekv/client: the FreeKV compute service for gateways and applications, in TypeScript.
 *
 *   const client = new FreeKvClient("freekv.freekv.svc:50051");
 *   for await (const e of client.generate({ prompt: { $case: "text", value: "Hello" }, maxTokens: 32 }))
 *     if (e.type === "chunk") process.stdout.write(e.text);
 *
 * What it adds to the generated stubs (proto/gen, from proto/freekv/v1/compute.proto):
 * - deadlines: every call has one (the call's own, or `defaultDeadlineMs`);
 * - retries with exponential backoff and jitter on UNAVAILABLE, for calls that did not start:
 *   unary calls, and a Generate stream only while it has delivered nothing (a stream that has
 *   produced tokens is never replayed, so no token is duplicated);
 * - streaming helpers: `generate()` is an async iterator of typed events, `generateText()`
 *   collects them, and breaking out of the loop (or an AbortSignal) cancels the call;
 * - session routing: a session lives on one pod (its KV is in that pod's shared memory); a
 *   compute that does not hold it may answer with the owner's address in the trailing metadata
 *   key `x-freekv-session-owner`, and the client then sends the call there (and remembers the
 *   session's address for its next calls). When a remembered pod no longer answers
 *   (UNAVAILABLE: it drained and handed its sessions off), the call goes to the configured
 *   address again, which redirects it to the session's new pod. A session that a pod answers
 *   NOT_FOUND for (it expired, or another client closed it) is forgotten, and the client remembers
 *   at most `maxRememberedSessions` sessions (the least recently used go first);
 * - flow control: a Generate stream is read only as fast as its events are consumed (the client
 *   reads a few dozen messages ahead at most, see `STREAM_BUFFER_MESSAGES`), so a consumer that
 *   stops pulling holds the server back instead of making the client buffer the whole answer;
 * - `moveSession()`: moves a session to another pod (SessionMoveService.MoveSession).
 * It needs neither the native addon nor the service's code: only gRPC and the generated messages.
 */
import { credentials as grpcCredentials, Metadata, status, type ChannelCredentials, type ClientReadableStream, type ServiceError } from "@grpc/grpc-js";
import {
  ComputeServiceClient,
  CloseSessionRequest,
  type CloseSessionResponse,
  CreateSessionRequest,
  type CreateSessionResponse,
  GenerateRequest,
  type GenerateResponse,
  GetSessionRequest,
  type GetSessionResponse,
  MoveSessionRequest,
  type MoveSessionResponse,
  SessionMoveServiceClient,
  type DeepPartial,
} from "../../../proto/gen/freekv/v1/compute.js";

export { CreateSessionRequest, GetSessionRequest, CloseSessionRequest, GenerateRequest, MoveSessionRequest };
export type { CreateSessionResponse, GetSessionResponse, CloseSessionResponse, GenerateResponse, MoveSessionResponse };

/** Trailing metadata key of a status that names the pod (host:port) holding the session. */
export const SESSION_OWNER_KEY = "x-freekv-session-owner";

export interface RetryOptions {
  /** Attempts in all, the first included (1: no retry). */
  maxAttempts: number;
  initialBackoffMs: number;
  maxBackoffMs: number;
  /** Backoff growth per attempt. */
  multiplier: number;
}

export interface ClientOptions {
  credentials?: ChannelCredentials;
  /** Deadline of a call that sets none. */
  defaultDeadlineMs?: number;
  retry?: Partial<RetryOptions>;
  /** Follow `x-freekv-session-owner` redirects (at most this many per call; 0: off). */
  maxRedirects?: number;
  /** Extra gRPC channel options. */
  channelOptions?: Record<string, unknown>;
  /**
   * How many sessions' pod addresses the client remembers (default 100,000); past that, the
   * least recently used are forgotten (their next call goes to the configured address, which
   * redirects it). Bounds the memory of a long-lived client that sees many sessions.
   */
  maxRememberedSessions?: number;
}

export interface CallOptions {
  /** Milliseconds from now. */
  deadlineMs?: number;
  signal?: AbortSignal;
  metadata?: Metadata;
}

/** What a Generate stream yields, typed. */
export type GenerateEvent =
  | { type: "chunk"; tokenIds: number[]; text: string; stepMs: number; batchSize: number }
  | { type: "progress"; prefilledTokens: number; promptTokens: number }
  | { type: "final"; final: NonNullable<Extract<GenerateResponse["event"], { $case: "final" }>>["value"] };

const DEFAULT_RETRY: RetryOptions = { maxAttempts: 4, initialBackoffMs: 100, maxBackoffMs: 2000, multiplier: 2 };

/**
 * How many messages of a Generate stream the client queues ahead of its consumer (the gRPC stream
 * reads as many again ahead of that queue): at this many the call is paused (gRPC then stops reading, HTTP/2 flow control holds the server back, and a
 * server that waits too long for a reader ends the call), and it is resumed once the consumer has
 * taken half of them.
 */
export const STREAM_BUFFER_MESSAGES = 16;

/** The wait before attempt `n` (1-based retry count): exponential with full jitter. */
export function backoffMs(retry: RetryOptions, n: number, random: () => number = Math.random): number {
  const cap = Math.min(retry.maxBackoffMs, retry.initialBackoffMs * retry.multiplier ** (n - 1));
  return Math.floor(random() * cap);
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const t = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(t);
      reject(signal!.reason);
    };
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

const ownerOf = (e: unknown): string | undefined => {
  const md = (e as ServiceError | undefined)?.metadata;
  const v = md?.get(SESSION_OWNER_KEY)?.[0];
  return typeof v === "string" && v.length > 0 && v.length <= 255 ? v : undefined;
};

export class FreeKvClient {
  private readonly channels = new Map<string, ComputeServiceClient>();
  private readonly moveChannels = new Map<string, SessionMoveServiceClient>();
  /** The pod address a session was last found on, least recently used first (see `remember`). */
  private readonly sessionAddress = new Map<string, string>();
  private readonly retry: RetryOptions;
  private readonly defaultDeadlineMs: number;
  private readonly maxRedirects: number;
  private readonly maxRememberedSessions: number;

  constructor(
    private readonly address: string,
    private readonly options: ClientOptions = {},
  ) {
    this.retry = { ...DEFAULT_RETRY, ...options.retry };
    if (!(this.retry.maxAttempts >= 1)) throw new RangeError("retry.maxAttempts must be >= 1");
    this.defaultDeadlineMs = options.defaultDeadlineMs ?? 60_000;
    this.maxRedirects = options.maxRedirects ?? 2;
    this.maxRememberedSessions = options.maxRememberedSessions ?? 100_000;
    if (!(Number.isInteger(this.maxRememberedSessions) && this.maxRememberedSessions >= 0)) throw new RangeError("maxRememberedSessions must be an integer >= 0");
  }

  /**
   * Records that `sessionId` is on `address`, as its most recently used entry (a Map keeps
   * insertion order: deleting and setting again moves it to the end), and forgets the least
   * recently used sessions past `maxRememberedSessions`.
   */
  private remember(sessionId: string, address: string): void {
    this.sessionAddress.delete(sessionId);
    if (this.maxRememberedSessions === 0) return;
    this.sessionAddress.set(sessionId, address);
    while (this.sessionAddress.size > this.maxRememberedSessions) this.sessionAddress.delete(this.sessionAddress.keys().next().value!);
  }

  /**
   * Forgets a session that the pod answered NOT_FOUND for (it expired there, or another client
   * closed it): nothing else would ever remove its entry.
   */
  private forgetIfGone(sessionId: string | undefined, e: unknown): void {
    if (sessionId && (e as ServiceError | undefined)?.code === status.NOT_FOUND) this.sessionAddress.delete(sessionId);
  }

  /**
   * The stub for an address (one channel per address, reused). Each gets its own copy of
   * `channelOptions`: gRPC takes `interceptors` out of the object it is given.
   */
  private stub(address: string): ComputeServiceClient {
    let c = this.channels.get(address);
    if (!c) {
      c = new ComputeServiceClient(address, this.options.credentials ?? grpcCredentials.createInsecure(), { ...this.options.channelOptions });
      this.channels.set(address, c);
    }
    return c;
  }

  /** The session-move stub for an address (one channel per address, reused). */
  private moveStub(address: string): SessionMoveServiceClient {
    let c = this.moveChannels.get(address);
    if (!c) {
      c = new SessionMoveServiceClient(address, this.options.credentials ?? grpcCredentials.createInsecure(), { ...this.options.channelOptions });
      this.moveChannels.set(address, c);
    }
    return c;
  }

  /**
   * Where the session's call goes next after `e` at `address`: a pod that no longer answers
   * (UNAVAILABLE) and is not the configured address is forgotten for the session, and the call
   * goes back to the configured address (which redirects it to the session's pod); undefined to
   * handle `e` as usual.
   */
  private fallback(sessionId: string | undefined, address: string, e: unknown): string | undefined {
    if ((e as ServiceError).code !== status.UNAVAILABLE || address === this.address) return undefined;
    if (sessionId && this.sessionAddress.get(sessionId) === address) this.sessionAddress.delete(sessionId);
    return this.address;
  }

  /** Where calls on `sessionId` go: its last known pod (now its most recently used), else the configured address. */
  addressFor(sessionId: string | undefined): string {
    const known = sessionId ? this.sessionAddress.get(sessionId) : undefined;
    if (sessionId && known) this.remember(sessionId, known);
    return known || this.address;
  }

  close(): void {
    for (const c of this.channels.values()) c.close();
    this.channels.clear();
    for (const c of this.moveChannels.values()) c.close();
    this.moveChannels.clear();
  }

  /**
   * Moves a session to the compute at `target` (host:port): the call goes to the session's pod
   * (following redirects) and is not retried (a failed move leaves the session where it was).
   * Afterwards the client sends the session's calls to `target`.
   */
  async moveSession(request: DeepPartial<MoveSessionRequest>, opts: CallOptions = {}): Promise<MoveSessionResponse> {
    const req = MoveSessionRequest.fromPartial(request);
    const res = await this.unary<MoveSessionResponse, SessionMoveServiceClient>((a) => this.moveStub(a), (s, md, o, cb) => s.moveSession(req, md, o, cb), req.sessionId, opts, undefined, 1);
    if (req.sessionId) this.remember(req.sessionId, res.target);
    return res;
  }

  createSession(request: DeepPartial<CreateSessionRequest>, opts: CallOptions = {}): Promise<CreateSessionResponse> {
    const req = CreateSessionRequest.fromPartial(request);
    return this.unary((a) => this.stub(a), (s, md, o, cb) => s.createSession(req, md, o, cb), req.sessionId, opts, (r) => r.session?.sessionId, this.retry.maxAttempts);
  }

  getSession(request: DeepPartial<GetSessionRequest>, opts: CallOptions = {}): Promise<GetSessionResponse> {
    const req = GetSessionRequest.fromPartial(request);
    return this.unary((a) => this.stub(a), (s, md, o, cb) => s.getSession(req, md, o, cb), req.sessionId, opts, undefined, this.retry.maxAttempts);
  }

  async closeSession(request: DeepPartial<CloseSessionRequest>, opts: CallOptions = {}): Promise<CloseSessionResponse> {
    const req = CloseSessionRequest.fromPartial(request);
    const res = await this.unary<CloseSessionResponse, ComputeServiceClient>((a) => this.stub(a), (s, md, o, cb) => s.closeSession(req, md, o, cb), req.sessionId, opts, undefined, this.retry.maxAttempts);
    // Closed: where it was is no longer worth remembering.
    this.sessionAddress.delete(req.sessionId);
    return res;
  }

  /**
   * Generate as an async iterator of events. Retried on UNAVAILABLE (with backoff) and redirected
   * to the session's owner only before the first event; breaking out of the loop cancels the call.
   * The stream is read as the events are consumed (see `STREAM_BUFFER_MESSAGES`): when the call
   * fails, every event the client received comes before the error, but gRPC lets an error status
   * overtake messages still in the transport, so a consumer that lags may not see the last events
   * the server sent before it failed. An aborted signal starts no call (an already aborted one
   * included), and ends the iteration at once with its reason: events received but not yet
   * consumed are dropped.
   */
  async *generate(request: DeepPartial<GenerateRequest>, opts: CallOptions = {}): AsyncGenerator<GenerateEvent, void, undefined> {
    const req = GenerateRequest.fromPartial(request);
    const deadline = Date.now() + (opts.deadlineMs ?? this.defaultDeadlineMs);
    let address = this.addressFor(req.sessionId);
    let redirects = 0;
    for (let attempt = 1; ; attempt++) {
      if (opts.signal?.aborted) throw opts.signal.reason;
      const call = this.stub(address).generate(req, opts.metadata ?? new Metadata(), { deadline });
      const onAbort = () => call.cancel();
      opts.signal?.addEventListener("abort", onAbort, { once: true });
      let delivered = false;
      try {
        for await (const m of iterate(call)) {
          // The caller gave up: what is still buffered is not handed out ahead of the abort.
          if (opts.signal?.aborted) throw opts.signal.reason;
          delivered = true;
          const e = toEvent(m);
          if (e?.type === "final" && e.final.sessionId && req.sessionId) this.remember(req.sessionId, address);
          if (e) yield e;
        }
        return;
      } catch (e) {
        if (opts.signal?.aborted) throw opts.signal.reason ?? e;
        this.forgetIfGone(req.sessionId, e);
        const owner = ownerOf(e);
        if (!delivered && owner && owner !== address && redirects < this.maxRedirects) {
          redirects++;
          address = owner;
          if (req.sessionId) this.remember(req.sessionId, owner);
          attempt--; // a redirect is not a failed attempt
          continue;
        }
        const back = delivered ? undefined : this.fallback(req.sessionId, address, e);
        if (back && redirects < this.maxRedirects) {
          redirects++;
          address = back;
          attempt--;
          continue;
        }
        if (delivered || (e as ServiceError).code !== status.UNAVAILABLE || attempt >= this.retry.maxAttempts) throw e;
        const wait = backoffMs(this.retry, attempt);
        if (Date.now() + wait >= deadline) throw e;
        await sleep(wait, opts.signal);
      } finally {
        opts.signal?.removeEventListener("abort", onAbort);
        call.cancel(); // a no-op once the call ended; stops it when the consumer broke out
      }
    }
  }

  /** The whole Generate: the text, the token ids and the final summary. */
  async generateText(request: DeepPartial<GenerateRequest>, opts: CallOptions = {}): Promise<{ text: string; tokenIds: number[]; final: Extract<GenerateEvent, { type: "final" }>["final"] }> {
    let text = "";
    const tokenIds: number[] = [];
    let final: Extract<GenerateEvent, { type: "final" }>["final"] | undefined;
    for await (const e of this.generate(request, opts)) {
      if (e.type === "chunk") {
        text += e.text;
        tokenIds.push(...e.tokenIds);
      } else if (e.type === "final") final = e.final;
    }
    if (!final) throw new Error("the Generate stream ended without its final message");
    return { text, tokenIds, final };
  }

  /** A unary call on the session's pod: redirects followed, UNAVAILABLE retried up to `maxAttempts` attempts. */
  private async unary<Res, S>(
    stubOf: (address: string) => S,
    invoke: (s: S, md: Metadata, o: { deadline: number }, cb: (e: ServiceError | null, r: Res) => void) => { cancel(): void },
    sessionId: string | undefined,
    opts: CallOptions,
    learned: ((r: Res) => string | undefined) | undefined,
    maxAttempts: number,
  ): Promise<Res> {
    const deadline = Date.now() + (opts.deadlineMs ?? this.defaultDeadlineMs);
    let address = this.addressFor(sessionId);
    let redirects = 0;
    for (let attempt = 1; ; attempt++) {
      try {
        const res = await new Promise<Res>((resolve, reject) => {
          if (opts.signal?.aborted) return reject(opts.signal.reason);
          // The call in flight is cancelled when the caller gives up (the server sees CANCELLED).
          const onAbort = () => call.cancel();
          const call = invoke(stubOf(address), opts.metadata ?? new Metadata(), { deadline }, (e, r) => {
            opts.signal?.removeEventListener("abort", onAbort);
            if (e) reject(e);
            else resolve(r);
          });
          opts.signal?.addEventListener("abort", onAbort, { once: true });
        });
        const id = learned?.(res) ?? sessionId;
        if (id) this.remember(id, address);
        return res;
      } catch (e) {
        if (opts.signal?.aborted) throw opts.signal.reason ?? e;
        this.forgetIfGone(sessionId, e);
        const owner = ownerOf(e);
        if (owner && owner !== address && redirects < this.maxRedirects) {
          redirects++;
          address = owner;
          attempt--;
          continue;
        }
        const back = this.fallback(sessionId, address, e);
        if (back && redirects < this.maxRedirects) {
          redirects++;
          address = back;
          attempt--;
          continue;
        }
        if ((e as ServiceError).code !== status.UNAVAILABLE || attempt >= maxAttempts) throw e;
        const wait = backoffMs(this.retry, attempt);
        if (Date.now() + wait >= deadline) throw e;
        await sleep(wait, opts.signal);
      }
    }
  }
}

function toEvent(m: GenerateResponse): GenerateEvent | undefined {
  const ev = m.event;
  if (!ev) return undefined;
  switch (ev.$case) {
    case "chunk":
      return { type: "chunk", tokenIds: ev.value.tokenIds, text: ev.value.text, stepMs: ev.value.stepMs, batchSize: ev.value.batchSize };
    case "final":
      return { type: "final", final: ev.value };
    case "progress":
      return { type: "progress", prefilledTokens: ev.value.prefilledTokens, promptTokens: ev.value.promptTokens };
    default:
      return undefined;
  }
}

/**
 * A server stream as an async iterable that rejects with the call's error status. It reads ahead
 * of its consumer by at most `STREAM_BUFFER_MESSAGES` messages: at that many the call is paused
 * (it no longer takes messages from gRPC, which stops reading from the server), and it is resumed
 * once the consumer has taken half of them.
 */
async function* iterate<T>(call: ClientReadableStream<T>): AsyncGenerator<T> {
  const queue: T[] = [];
  let paused = false;
  let done = false;
  let error: unknown;
  let wake: (() => void) | undefined;
  call.on("data", (m: T) => {
    queue.push(m);
    if (!paused && queue.length >= STREAM_BUFFER_MESSAGES) {
      paused = true;
      call.pause();
    }
    wake?.();
  });
  call.on("error", (e) => {
    // A paused stream may still hold messages that gRPC handed up before the status (it reads a
    // few ahead): they are taken now (each one a 'data' event), so none the client received is lost behind the error.
    while (call.read() !== null);
    error = e;
    done = true;
    wake?.();
  });
  call.on("end", () => {
    done = true;
    wake?.();
  });
  for (;;) {
    if (queue.length) {
      const m = queue.shift()!;
      if (paused && !done && queue.length <= STREAM_BUFFER_MESSAGES / 2) {
        paused = false;
        call.resume();
      }
      yield m;
      continue;
    }
    if (done) {
      if (error) throw error;
      return;
    }
    await new Promise<void>((r) => (wake = r));
    wake = undefined;
  }
}
