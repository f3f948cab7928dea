/**
 * ComputeService.Generate: prompt (text, token ids or chat messages) -> streamed tokens, with
 * the served model running its attention through the session's FreeKV engine session.
 *
 * - A request without session_id gets a fresh session (closed, segments released, at the end);
 *   with one it continues that session's KV (multi-turn: only the new tokens are prefilled),
 *   holding the session's lock meanwhile.
 * - The prompt is prefilled in chunks and decode steps of concurrent requests are batched, all
 *   through the served model's one ModelScheduler: other sessions keep decoding while a long
 *   prompt is read. With `prefill_progress_min_tokens`, a prompt at least that long reports its
 *   progress after each chunk.
 * - The call's deadline or cancellation stops the work between chunks and steps; a fresh session
 *   is then closed; a continued one stays consistent: its last sampled token is fed by the next
 *   request, and of a prompt cancelled during its prefill the chunks that ran stay in its context.
 * - Memory follows the context: before a turn, the session's reservation at the kvstore grows to
 *   what the turn can reach (its context, the pending token, the prompt and max_tokens, capped by
 *   max_context_tokens), in the request queue like a fresh session's memory: a turn the kvstore
 *   has no room for waits; one that could never fit gets RESOURCE_EXHAUSTED.
 * - Bad input: INVALID_ARGUMENT naming the field (a prompt over the session's max_context_tokens
 *   included, refused before anything is fed); the model still loading: UNAVAILABLE; no model or
 *   a failed load: FAILED_PRECONDITION; unknown session: NOT_FOUND.
 */
import { status, type handleServerStreamingCall, type ServerWritableStream } from "@grpc/grpc-js";
import {
  FinishReason,
  SessionKind,
  type CreateSessionRequest,
  type GenerateRequest,
  type GenerateResponse,
} from "../../../proto/gen/freekv/v1/compute.js";
import { callScope } from "../../common/cancellation.js";
import { send, WriteStalled } from "../../common/streams.js";
import { tenantOf } from "../sessions/tenant.js";
import { localSession } from "../sessions/owners.js";
import { checkTenant } from "../auth.js";
import { ServiceError, failedPrecondition, invalidArgument, neverFits, quoteId, toStatus } from "../../common/errors.js";
import type { ComputeContext } from "../context.js";
import type { LoadedModel } from "../model/loader.js";
import { modelSessionBytes } from "../sessions/footprint.js";
import type { ComputeSession } from "../sessions/session.js";
import { CommitFailed } from "../sessions/manager.js";
import { SHORT_OF_MEMORY, type Admitted } from "./admission.js";
import { generateMetrics } from "./metrics.js";
import { stopProblem } from "./stop.js";
import { ModelCallFailed } from "./scheduler.js";
import { SAVE_WAIT_MS } from "../attention/batcher.js";
import { divergedError, markDiverged } from "../sessions/diverged.js";
import { checkPromptFits, generate, GenerateError, isProgress, validateParams, type FinishReason as Finish, type GenerateFinalOut, type GenerationSession } from "./generation.js";
import { checkSessionId } from "../../common/session-id.js";

const FINISH: Record<Exclude<Finish, "cancelled">, FinishReason> = {
  length: FinishReason.FINISH_REASON_LENGTH,
  stop_token: FinishReason.FINISH_REASON_STOP_TOKEN,
  stop_string: FinishReason.FINISH_REASON_STOP_STRING,
  context_full: FinishReason.FINISH_REASON_CONTEXT_FULL,
};

/** What a model session carries between Generate calls (kept in the session's metadata). */
interface GenerateState {
  /** The last sampled token, not yet in the KV cache. */
  pendingToken?: number;
}

/**
 * The request's prompt as token ids. `continuing`: the session's cache already holds tokens (a
 * later turn), so no BOS is added; an empty session, fresh or named, starts with one.
 */
function promptTokens(req: GenerateRequest, loaded: LoadedModel, continuing: boolean): number[] {
  const p = req.prompt;
  if (!p) throw invalidArgument("prompt", "one of text, tokens or chat is required");
  if (p.$case === "tokens") {
    if (p.value.ids.length === 0) throw invalidArgument("prompt.tokens", "must not be empty");
    return p.value.ids;
  }
  const codec = loaded.codec;
  if (!codec) throw failedPrecondition(`prompt.${p.$case}: the served model has no tokenizer.json; send prompt.tokens`);
  if (p.$case === "text") {
    if (!p.value) throw invalidArgument("prompt.text", "must not be empty");
    return codec.encode(p.value, !continuing);
  }
  if (p.value.messages.length === 0) throw invalidArgument("prompt.chat.messages", "must not be empty");
  p.value.messages.forEach((m, i) => {
    if (!m.role) throw invalidArgument(`prompt.chat.messages[${i}].role`, "must not be empty");
  });
  if (!codec.hasChatTemplate) throw failedPrecondition("prompt.chat: the served model has no chat template");
  return codec.encodeChat(p.value.messages, continuing);
}

/** The request metadata header naming the tenant, for fair queueing (round-robin between tenants). */
export { TENANT_HEADER } from "../sessions/tenant.js";

/** Context tokens a turn on `s` can reach: what it holds, its pending token, the prompt and max_tokens. */
function turnReach(s: ComputeSession, promptTokens: number, maxTokens: number): number {
  const pending = (s.metadata.generate as GenerateState | undefined)?.pendingToken !== undefined ? 1 : 0;
  return Math.min(s.maxContextTokens, s.contextTokens + pending + promptTokens + maxTokens);
}

const isResourceExhausted = (e: unknown) => typeof e === "object" && e !== null && (e as { code?: unknown }).code === status.RESOURCE_EXHAUSTED;

/** What the request's log line and latency metrics report, filled as the request goes. */
interface RequestRecord {
  arrived: number;
  tenant?: string;
  session?: string;
  queuedMs?: number;
  firstTokenAt?: number;
  lastTokenAt?: number;
  final?: GenerateFinalOut;
}

/**
 * A model call of this turn failed after it may have appended to the named session
 * (ModelCallFailed): the session is marked diverged (its calls get DATA_LOSS until it is closed,
 * sessions/diverged.ts), counted and logged, and its mark is saved at the kvstore before the
 * answer (the wait bounded as the Attention stream's). Returns the call's error. (A request's own
 * session is closed at its end: its failure is an internal error, logged as such.)
 */
async function diverged(ctx: ComputeContext, s: ComputeSession, e: ModelCallFailed): Promise<ServiceError> {
  const marked = markDiverged(s, e.what, e.cause);
  const error = marked ?? divergedError(s)!;
  if (!marked) return error;
  ctx.metrics.sessionsDiverged.inc();
  ctx.log.warn(
    { session: s.id, contextTokens: s.contextTokens, err: e.cause instanceof Error ? e.cause.message : String(e.cause) },
    `session diverged: ${e.what} of Generate failed in the model after it may have appended to the session; its calls get DATA_LOSS until it is closed`,
  );
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([ctx.sessions.saveDataLoss(s), new Promise((r) => (timer = setTimeout(r, SAVE_WAIT_MS)))]);
  clearTimeout(timer);
  return error;
}

export function generateHandler(ctx: ComputeContext): handleServerStreamingCall<GenerateRequest, GenerateResponse> {
  const metrics = generateMetrics(ctx.metrics.registry, ctx.admission, ctx.kvstore);
  const stallMs = ctx.config.FREEKV_WRITE_STALL_MS;

  return (call) => {
    const scope = callScope(call);
    const { signal } = scope;
    const rec: RequestRecord = { arrived: performance.now() };
    void serve(call, signal, rec)
      .then(() => finished(rec, status.OK))
      .catch((e: unknown) => {
        const err = e instanceof GenerateError ? (e.kind === "invalid_argument" ? new ServiceError(status.INVALID_ARGUMENT, e.message) : failedPrecondition(e.message)) : e;
        const st = toStatus(err, ctx.log, "Generate", signal);
        // A client that stopped reading is told apart from one whose own deadline passed.
        metrics.requests.inc({ finish: e instanceof WriteStalled ? "write_stalled" : (status[st.code]?.toLowerCase() ?? String(st.code)) });
        finished(rec, st.code, st.details);
        call.emit("error", st);
      })
      .finally(() => scope.done());
  };

  /** The request's end: its latency metrics and its one info line. */
  function finished(rec: RequestRecord, code: status, details?: string): void {
    const now = performance.now();
    metrics.e2eSeconds.observe((now - rec.arrived) / 1000);
    const f = rec.final;
    const ttftMs = rec.firstTokenAt !== undefined ? rec.firstTokenAt - rec.arrived : undefined;
    const n = f?.completionTokens ?? 0;
    const tpotMs = n > 1 && rec.firstTokenAt !== undefined && rec.lastTokenAt !== undefined ? (rec.lastTokenAt - rec.firstTokenAt) / (n - 1) : undefined;
    if (tpotMs !== undefined) {
      metrics.timePerOutputToken.observe(tpotMs / 1000);
      if (tpotMs > 0) metrics.decodeTokensPerSecond.observe(1000 / tpotMs);
    }
    const round = (x: number | undefined) => (x === undefined ? undefined : Math.round(x * 100) / 100);
    ctx.log.info(
      {
        session: rec.session,
        tenant: rec.tenant || undefined,
        promptTokens: f?.promptTokens,
        completionTokens: f?.completionTokens,
        queueMs: round(rec.queuedMs),
        ttftMs: round(ttftMs),
        tpotMs: round(tpotMs),
        e2eMs: round(now - rec.arrived),
        finish: f && code === status.OK ? f.finishReason : undefined,
        status: status[code] ?? String(code),
        error: details,
      },
      "generate finished",
    );
  }

  /** Whether a named session can serve Generate at all: DATA_LOSS or FAILED_PRECONDITION if not. */
  function checkModelSession(named: ComputeSession): void {
    // A session whose context is lost or unknown (diverged) answers DATA_LOSS to every call, Generate included.
    ctx.sessions.checkLost(named);
    if (named.kind !== SessionKind.SESSION_KIND_MODEL) throw failedPrecondition(`session ${JSON.stringify(named.id)} is an attention session; Generate needs a model session`);
    // Made for another model (re-attached after FREEKV_MODEL changed): its cache has other shapes.
    const served = ctx.served.geometry();
    const g = named.geometry;
    if (g.layers !== served.layers || g.queryHeads !== served.queryHeads || g.kvHeads !== served.kvHeads || g.headDim !== served.headDim) {
      throw failedPrecondition(
        `session ${JSON.stringify(named.id)} was made for a model of ${g.layers} layers, ${g.queryHeads} query heads, ${g.kvHeads} KV heads, head dim ${g.headDim}; this compute serves ${served.layers}, ${served.queryHeads}, ${served.kvHeads}, ${served.headDim}`,
      );
    }
  }

  async function serve(call: ServerWritableStream<GenerateRequest, GenerateResponse>, signal: AbortSignal, rec: RequestRecord): Promise<void> {
    const req = call.request;
    rec.tenant = tenantOf(call.metadata);
    const { loaded, scheduler } = ctx.served.get();
    if (!Number.isInteger(req.maxTokens) || req.maxTokens < 1) throw invalidArgument("max_tokens", `must be >= 1, got ${req.maxTokens}`);
    const stops = stopProblem(req.stopStrings, req.stopTokenIds);
    if (stops) throw invalidArgument(stops.field, stops.why);
    const fresh = !req.sessionId;
    // Checked before any lookup (a directory's, with the id) or queueing, as CreateSession does.
    if (!fresh) checkSessionId(req.sessionId);
    if (!fresh && req.retrieval) throw invalidArgument("retrieval", "is for a fresh session only (create the session with it instead)");
    // A fresh session is empty; a named one is tokenized again under its lock, where its context is known.
    let prompt = promptTokens(req, loaded, false);
    // A fresh session lives for this call only: its store holds what the call can reach (the
    // prompt and max_tokens), not the default maximum, so a short request neither reserves nor
    // registers the memory of a long one (at 128K tokens of an 8B model, 17 GB and seconds).
    const reach = Math.min(ctx.config.FREEKV_MAX_CONTEXT_TOKENS, prompt.length + req.maxTokens);
    // Before the session's segments are made (sized by its context).
    if (fresh) checkPromptFits(prompt.length, 0, ctx.config.FREEKV_MAX_CONTEXT_TOKENS);
    // The fresh session's retrieval settings (and what the engine can hold of them): refused now,
    // not at the request's deadline behind a busy server; created with the same request below.
    const freshSession: CreateSessionRequest = { sessionId: "", kind: SessionKind.SESSION_KIND_MODEL, retrieval: req.retrieval, maxContextTokens: reach, geometry: undefined };
    if (fresh) ctx.sessions.resolveNew(freshSession);
    // What the request alone decides (token ids, sampling, stop ids) is checked before it queues or
    // anything is reserved; generate() checks it again with the session's state under its lock.
    const sp = req.sampling ?? { temperature: 0, topP: 0, topK: 0, seed: 0 };
    const sampling = { temperature: sp.temperature, topP: sp.topP, topK: sp.topK, seed: BigInt(sp.seed || 0) };
    validateParams({ prompt, maxTokens: req.maxTokens, sampling, stopTokenIds: req.stopTokenIds, stopStrings: req.stopStrings }, loaded.model.vocabSize);
    // Stop strings are matched on decoded text: never silently ignored for a model without one.
    if (req.stopStrings.length && !loaded.codec) throw failedPrecondition("stop_strings: the served model has no tokenizer.json to decode its output with; use stop_token_ids");
    // A named session held here whose reservation is short of this turn needs memory too.
    // (Looked at without touching it: a call refused below does not keep it from idle expiry.)
    const known = fresh ? undefined : ctx.sessions.peek(req.sessionId);
    // Another tenant's session is refused before anything about it is said (its context length).
    if (known && ctx.auth) checkTenant(known.metadata.tenant, rec.tenant, req.sessionId);
    // A session that can never serve this call (lost, an attention session, another model's) is
    // refused before it queues; one not held here yet is checked once found, in the attempt.
    if (known) checkModelSession(known);
    // A turn that cannot fit the named session's context is refused before its reservation grows
    // (the context only grows, so the check under the lock can only agree).
    if (known) {
      const pend = (known.metadata.generate as GenerateState | undefined)?.pendingToken !== undefined ? 1 : 0;
      const turn = known.contextTokens > 0 || pend ? promptTokens(req, loaded, true) : prompt;
      checkPromptFits(turn.length, known.contextTokens + pend, known.maxContextTokens);
    }
    // A named turn first waits for the turns before it on its session, holding nothing: it takes a
    // running slot only when its session is free for it (else many turns on one session hold every
    // slot while they wait for its lock). A turn that has to wait counts as a waiting request
    // (FREEKV_QUEUE_MAX_REQUESTS).
    const turnDone = known ? await (known.turnLock.busy ? ctx.admission.waitBefore(() => known.turnLock.acquire(signal)) : known.turnLock.acquire(signal)) : undefined;
    try {
      const needsMemory = fresh || (known !== undefined && turnReach(known, prompt.length, req.maxTokens) > known.reservedTokens);
      // The request waits its turn: a running slot, and its memory at the kvstore (a fresh session's
      // segments, or a named session's larger reservation).
      const admitted: Admitted<ComputeSession> = await ctx.admission.enter<ComputeSession>({
        tenant: rec.tenant,
        signal,
        needsMemory,
        attempt: fresh
          ? async () => {
              try {
                return await ctx.sessions.create(freshSession, signal, undefined, reach, true);
              } catch (e) {
                if (!isResourceExhausted(e) || signal.aborted) throw e;
                await refuseIfNeverFits(req, reach, signal);
                return SHORT_OF_MEMORY;
              }
            }
          : async () => {
              const named = await localSession(ctx.sessions, ctx.owners, req.sessionId, ctx.auth ? rec.tenant : undefined);
              checkModelSession(named);
              const need = turnReach(named, prompt.length, req.maxTokens);
              try {
                await ctx.sessions.reserve(named, need, signal);
              } catch (e) {
                if (!isResourceExhausted(e) || signal.aborted) throw e;
                await refuseNamedIfNeverFits(named, need, signal);
                return SHORT_OF_MEMORY;
              }
              return named;
            },
        // Checked while it waits behind a request short of memory: one that can never fit is refused
        // then, not at its deadline.
        fits: fresh
          ? () => refuseIfNeverFits(req, reach, signal)
          : known
            ? () => refuseNamedIfNeverFits(known, turnReach(known, prompt.length, req.maxTokens), signal)
            : undefined,
      });
      rec.queuedMs = admitted.queuedMs;
      metrics.queueSeconds.observe(admitted.queuedMs / 1000);
      const s = admitted.value;
      rec.session = s.id;
      let release: (() => void) | undefined;
      let final: GenerateFinalOut | undefined;
      let gs: GenerationSession | undefined;
      let state: GenerateState | undefined;
      let saved = false; // the turn's metadata went to the kvstore before the final answer
      let startTokens: number | undefined; // the session's context when the turn began writing
      try {
        release = await s.lock.acquire(signal);
        // Closed meanwhile, or moved to another pod (then the call is redirected there).
        if (s.closed) throw ctx.sessions.goneError(s.id);
        // Lost (DATA_LOSS), or degraded by a commit the kvstore did not take (UNAVAILABLE): refused
        // before anything is written, so that a retry of this call writes its prompt once.
        ctx.sessions.checkCommits(s);
        state = (s.metadata.generate as GenerateState | undefined) ?? {};
        s.metadata.generate = state;
        // An empty named session (CreateSession, then its first Generate) starts like a fresh one:
        // with BOS. Only a session whose cache holds tokens is continued without it.
        if (!fresh && (s.contextTokens > 0 || state.pendingToken !== undefined)) prompt = promptTokens(req, loaded, true);
        // The reservation made in the queue was sized before the lock: another turn may have grown
        // the context since. A shortfall now fails the call (RESOURCE_EXHAUSTED) rather than
        // writing past the memory the kvstore committed.
        if (!fresh) await ctx.sessions.reserve(s, turnReach(s, prompt.length, req.maxTokens), signal);
        const session = s;
        startTokens = s.contextTokens;
        gs = {
          session: s.engineSession,
          contextTokens: s.contextTokens,
          maxContextTokens: s.maxContextTokens,
          pendingToken: state.pendingToken,
          onAppended: (n) => {
            for (let l = 0; l < session.layerTokens.length; l++) session.layerTokens[l] = n;
            ctx.sessions.commitProgressAll(session);
          },
        };
        const it = generate(loaded.model, scheduler, loaded.codec, gs, {
          prompt,
          maxTokens: req.maxTokens,
          sampling,
          // The model's EOS ids end a generation, as in other servers, unless the request sets
          // ignore_eos.
          stopTokenIds: [...new Set([...req.stopTokenIds, ...(req.ignoreEos ? [] : loaded.spec.eosTokenIds.filter((t) => t < loaded.model.vocabSize))])],
          stopStrings: req.stopStrings,
          signal,
          progressMinTokens: req.prefillProgressMinTokens,
        });
        // A chunk is written in the next setImmediate phase, after the generation has queued its
        // next step (and the scheduler, once every request of the batch has, started it): the
        // serialisation and HTTP/2 work of the batch's chunks overlaps the next native step instead
        // of delaying it. At most one chunk is outstanding, so a slow client still holds the
        // generation back (backpressure), and chunks keep their order.
        let pending: Promise<void> = Promise.resolve();
        for (;;) {
          const r = await it.next();
          if (r.done) {
            final = r.value;
            break;
          }
          const c = r.value;
          if (!isProgress(c) && c.tokenIds.length) {
            const now = performance.now();
            if (rec.firstTokenAt === undefined) {
              rec.firstTokenAt = now;
              metrics.timeToFirstToken.observe((now - rec.arrived) / 1000);
            }
            rec.lastTokenAt = now;
          }
          await pending;
          const msg: GenerateResponse = isProgress(c)
            ? { event: { $case: "progress", value: { prefilledTokens: c.prefilledTokens, promptTokens: c.promptTokens } } }
            : { event: { $case: "chunk", value: { tokenIds: c.tokenIds, text: c.text, stepMs: c.stepMs, batchSize: c.batchSize } } };
          pending = new Promise<void>((resolve, reject) => setImmediate(() => send(call, msg, signal, stallMs).then(resolve, reject)));
          pending.catch(() => {}); // observed by the next await; never an unhandled rejection
        }
        await pending;
        rec.final = final;
        metrics.tokens.inc({ kind: "prompt" }, final.promptTokens);
        metrics.tokens.inc({ kind: "completion" }, final.completionTokens);
        if (final.finishReason === "cancelled" || signal.aborted) throw signal.reason ?? new ServiceError(status.CANCELLED, "call cancelled");
        metrics.prefillSeconds.observe(final.prefillMs / 1000);
        if (final.prefillMs > 0) metrics.prefillTokensPerSecond.observe(final.prefilledTokens / (final.prefillMs / 1000));
        // The turn's end (the pending token) reaches the kvstore before the client hears of it: a
        // compute that dies right after the answer leaves a session that continues exactly. A
        // failed commit is logged and retried with the session's pages (it stays degraded meanwhile).
        if (state && gs) state.pendingToken = gs.pendingToken;
        if (!fresh && state && !s.closed) {
          saved = true;
          await ctx.sessions.commitMetadata(s).catch((e: Error) => ctx.log.warn({ session: s.id, err: e.message }, "committing the session's metadata failed"));
        }
        await send(
          call,
          {
            event: {
              $case: "final",
              value: {
                finishReason: FINISH[final.finishReason],
                usage: {
                  promptTokens: final.promptTokens,
                  completionTokens: final.completionTokens,
                  contextTokens: final.contextTokens,
                  prefillMs: final.prefillMs,
                  decodeMs: final.decodeMs,
                  queueMs: admitted.queuedMs,
                },
                stats: ctx.sessions.stats(s),
                sessionId: s.id,
                maxBatchSize: final.maxBatchSize,
              },
            },
          },
          signal,
          stallMs,
        );
        // Counted once the answer is out: a final event that cannot be sent counts as the failure
        // it becomes (cancelled, deadline_exceeded, write_stalled), not as both.
        metrics.requests.inc({ finish: final.finishReason });
        call.end();
      } catch (e) {
        if (e instanceof ModelCallFailed && !fresh) throw await diverged(ctx, s, e);
        throw !fresh && startTokens !== undefined ? writtenThenUnavailable(s.id, e, s.contextTokens - startTokens) : e;
      } finally {
        // The KV cache holds every token but the last sampled one, also after an error or a
        // cancellation between steps: the next request on the session feeds it first.
        if (state && gs) state.pendingToken = gs.pendingToken;
        // A continued session's metadata (the pending token) goes to the kvstore with its pages, so
        // a restarted compute that re-attaches the session continues the conversation exactly
        // (already done before the final answer, unless the turn ended otherwise).
        if (!saved && !fresh && state && !s.closed) await ctx.sessions.commitMetadata(s).catch((e: Error) => ctx.log.warn({ session: s.id, err: e.message }, "committing the session's metadata failed"));
        release?.();
        if (fresh) await ctx.sessions.close(s.id).catch((e: Error) => ctx.log.warn({ session: s.id, err: e.message }, "closing the request's session failed"));
        // After the fresh session's memory went back to the kvstore: the next request may take it.
        admitted.release();
      }
    } finally {
      turnDone?.();
    }
  }

  /**
   * The kvstore's whole capacity in bytes, or undefined when it could not be read (the kvstore did
   * not answer): whether a request can ever fit is then unknown, and it keeps waiting (bounded by
   * its deadline) instead of failing with the kvstore's error. A cancelled call still ends.
   */
  async function kvstoreCapacity(signal: AbortSignal, what: string): Promise<number | undefined> {
    try {
      return (await ctx.kvstore.stats(signal)).capacityBytes;
    } catch (e) {
      if (signal.aborted) throw signal.reason ?? e;
      ctx.log.warn({ err: (e as Error).message }, `reading the kvstore's capacity failed: whether ${what} can ever fit is unknown, it waits for memory`);
      return undefined;
    }
  }

  /**
   * A named session whose turn the kvstore could not reserve: RESOURCE_EXHAUSTED now when the
   * session at that reservation is bigger than the kvstore's whole capacity, else the caller waits.
   * Resolves false when the capacity could not be read (undecided).
   */
  async function refuseNamedIfNeverFits(s: ComputeSession, need: number, signal: AbortSignal): Promise<boolean> {
    const bytes = modelSessionBytes(s.geometry, s.geometry.kvDtype, s.retrieval, s.maxContextTokens, need);
    const capacityBytes = await kvstoreCapacity(signal, `session ${JSON.stringify(s.id)}'s turn`);
    if (capacityBytes === undefined) return false;
    if (bytes > capacityBytes)
      throw neverFits(
        `session ${JSON.stringify(s.id)} needs ${bytes} bytes of host KV memory for ${need} tokens (its context + prompt + max_tokens), more than the kvstore's whole capacity of ${capacityBytes} bytes: it can never fit`,
      );
    return true;
  }

  /**
   * A fresh session the kvstore refused for capacity: RESOURCE_EXHAUSTED now when it is bigger
   * than the kvstore's whole capacity (it would wait forever), else the caller waits. Resolves
   * false when the capacity could not be read (undecided). (What the engine can hold of it was
   * checked before it queued: SessionManager.resolveNew.)
   */
  async function refuseIfNeverFits(req: GenerateRequest, reach: number, signal: AbortSignal): Promise<boolean> {
    const geometry = ctx.served.geometry();
    const need = modelSessionBytes(geometry, ctx.kvDtype, req.retrieval, reach);
    const capacityBytes = await kvstoreCapacity(signal, "the request's session");
    if (capacityBytes === undefined) return false;
    if (need > capacityBytes)
      throw neverFits(
        `the request's session needs ${need} bytes of host KV memory for ${reach} tokens (prompt + max_tokens), more than the kvstore's whole capacity of ${capacityBytes} bytes: it can never fit`,
      );
    return true;
  }
}

/**
 * A continued session's turn that failed UNAVAILABLE (a commit the kvstore did not take) after it
 * had written tokens into the session: ABORTED instead, which no client retries as if nothing had
 * happened (the retry would write the prompt a second time). The session keeps those tokens and
 * stays usable; the message says how many and how to go on.
 */
function writtenThenUnavailable(id: string, e: unknown, written: number): unknown {
  // Only a commit's failure: a drain's UNAVAILABLE keeps its meaning (README, "SIGTERM drains").
  if (written <= 0 || !(e instanceof CommitFailed) || e.code !== status.UNAVAILABLE) return e;
  return new ServiceError(
    status.ABORTED,
    `${e.message}; this turn had already written ${written} tokens into session ${quoteId(id)}, which keeps them: continue the session (GetSession gives its context) rather than send the turn again`,
    e.trailers,
  );
}

