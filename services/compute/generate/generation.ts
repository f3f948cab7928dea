/**
 * One generation request on one session: prefill of the prompt in chunks through the
 * ModelScheduler (other sessions' decode steps run between two chunks; a cancellation stops a
 * long prompt between chunks), then sampled decode steps through the same scheduler (batched with
 * other requests' steps), streamed as chunks, ending with usage. Used by the gRPC Generate
 * handler and by `freekv generate`.
 *
 * A session's last sampled token is not in its KV cache yet (it is the input of the next step);
 * it is returned as `pendingToken` and a later request on the session feeds it first, so a
 * multi-turn conversation's cache holds every token exactly once, and a follow-up turn prefills
 * only its new tokens.
 *
 * A prompt that does not fit the session's context is refused before anything is fed. A
 * cancellation during the prefill keeps the chunks that ran: they are in the session's context
 * (and committed like any other tokens) and the rest of the prompt is dropped; the session stays
 * consistent and the next request continues after the last chunk that ran.
 */
import type { Model } from "../../../native/binding.js";
import type { TextCodec } from "../model/tokenizer.js";
import { Sampler, sampleWith, validateSampling, type SampleDraw, type SamplingOptions } from "./sampling.js";
import { ModelCallFailed, type ModelScheduler } from "./scheduler.js";
import { StopMatcher } from "./stop.js";

export type FinishReason = "length" | "stop_token" | "stop_string" | "context_full" | "cancelled";

export class GenerateError extends Error {
  constructor(
    readonly kind: "invalid_argument" | "failed_precondition",
    message: string,
  ) {
    super(message);
    this.name = "GenerateError";
  }
}

export interface GenerationSession {
  /** The model's session number (the engine's session handle). */
  session: number;
  /** Tokens in the session's KV cache (the position of the next token fed). */
  contextTokens: number;
  maxContextTokens: number;
  /** The previous request's last sampled token, not yet fed. */
  pendingToken?: number;
  /** Called after tokens were appended to every layer (the service commits pages then). */
  onAppended?: (contextTokens: number) => void;
}

export interface GenerateParams {
  prompt: number[];
  maxTokens: number;
  sampling: SamplingOptions;
  stopTokenIds: number[];
  stopStrings: string[];
  signal?: AbortSignal;
  /** Yield a GenerateProgressOut after each prefill chunk when the prompt has at least this many tokens (0 or unset: never). */
  progressMinTokens?: number;
}

export interface GenerateChunkOut {
  tokenIds: number[];
  text: string;
  stepMs: number;
  batchSize: number;
}

/** Prefill progress: prompt tokens in the session's KV so far, of `promptTokens`. */
export interface GenerateProgressOut {
  prefilledTokens: number;
  promptTokens: number;
}

export type GenerateEvent = GenerateChunkOut | GenerateProgressOut;

export const isProgress = (e: GenerateEvent): e is GenerateProgressOut => "prefilledTokens" in e;

export interface GenerateFinalOut {
  finishReason: FinishReason;
  promptTokens: number;
  /** Tokens run through the model's prefill: the prompt, after the previous answer's last token on a continued session. */
  prefilledTokens: number;
  completionTokens: number;
  contextTokens: number;
  prefillMs: number;
  decodeMs: number;
  maxBatchSize: number;
  tokens: number[];
  pendingToken?: number;
}

export function validateParams(p: GenerateParams, vocab: number): void {
  if (p.prompt.length === 0) throw new GenerateError("invalid_argument", "prompt: must not be empty");
  p.prompt.forEach((t, i) => {
    if (!Number.isInteger(t) || t < 0 || t >= vocab)
      throw new GenerateError("invalid_argument", `prompt.tokens[${i}]: token id ${t} is out of range [0, ${vocab})`);
  });
  if (!Number.isInteger(p.maxTokens) || p.maxTokens < 1) throw new GenerateError("invalid_argument", `max_tokens: must be >= 1, got ${p.maxTokens}`);
  const bad = validateSampling(p.sampling);
  if (bad) throw new GenerateError("invalid_argument", bad);
  p.stopTokenIds.forEach((t, i) => {
    if (!Number.isInteger(t) || t < 0 || t >= vocab)
      throw new GenerateError("invalid_argument", `stop_token_ids[${i}]: token id ${t} is out of range [0, ${vocab})`);
  });
}

/** A prompt of `promptTokens` must fit what is left of the context: INVALID_ARGUMENT, before anything is fed. */
export function checkPromptFits(promptTokens: number, usedTokens: number, maxContextTokens: number): void {
  if (usedTokens + promptTokens > maxContextTokens)
    throw new GenerateError(
      "invalid_argument",
      `prompt: ${promptTokens} tokens do not fit the session's context: ${usedTokens} of max_context_tokens ${maxContextTokens} are used, ${Math.max(0, maxContextTokens - usedTokens)} left`,
    );
}

export async function* generate(
  model: Model,
  scheduler: ModelScheduler,
  codec: TextCodec | undefined,
  s: GenerationSession,
  p: GenerateParams,
): AsyncGenerator<GenerateEvent, GenerateFinalOut> {
  const V = model.vocabSize;
  // The context check comes before any copy of the prompt or any model work.
  const pending = s.pendingToken !== undefined ? 1 : 0;
  checkPromptFits(p.prompt.length, s.contextTokens + pending, s.maxContextTokens);
  validateParams(p, V);
  const feed = Int32Array.from(pending ? [s.pendingToken!, ...p.prompt] : p.prompt);
  const sampler = new Sampler(p.sampling);
  const stop = new StopMatcher(new Set(p.stopTokenIds), p.stopStrings.filter((x) => x.length > 0), codec ? (ids) => codec.decode(ids) : undefined);
  const progress = !!p.progressMinTokens && p.prompt.length >= p.progressMinTokens;
  const final: GenerateFinalOut = {
    finishReason: "length",
    promptTokens: p.prompt.length,
    prefilledTokens: 0,
    completionTokens: 0,
    contextTokens: s.contextTokens,
    prefillMs: 0,
    decodeMs: 0,
    maxBatchSize: 0,
    tokens: [],
  };

  const t0 = performance.now();
  let logits: Float32Array | undefined;
  const order = scheduler.promptOrder();
  for (let i = 0; i < feed.length; ) {
    if (p.signal?.aborted) {
      final.finishReason = "cancelled";
      return final;
    }
    let took: number;
    try {
      const r = await scheduler.prefill(s.session, feed.subarray(i), s.contextTokens, p.signal, order);
      logits = r.logits;
      took = r.tokens;
    } catch (e) {
      // Dropped from the queue by the cancellation: it never ran. (A chunk that ran and failed is
      // reported whatever the signal says: it may have appended.)
      if (p.signal?.aborted && !(e instanceof ModelCallFailed)) {
        final.finishReason = "cancelled";
        return final;
      }
      throw e;
    }
    i += took;
    s.contextTokens += took;
    s.pendingToken = undefined;
    final.prefilledTokens += took;
    s.onAppended?.(s.contextTokens);
    if (progress) yield { prefilledTokens: i - pending, promptTokens: p.prompt.length };
  }
  final.prefillMs = performance.now() - t0;
  final.contextTokens = s.contextTokens;

  let stepMs = final.prefillMs;
  let batchSize = 1;
  let picked: number | undefined;
  let draw: SampleDraw | undefined;
  for (;;) {
    // The draw made for this token when the batch's sampling did not make it.
    const tok = picked ?? (draw ? sampleWith(logits!, 0, V, draw) : sampler.sample(logits!, 0, V));
    final.tokens.push(tok);
    final.completionTokens++;
    s.pendingToken = tok;
    final.pendingToken = tok;
    const { text, stop: why } = stop.push(final.tokens);
    yield { tokenIds: [tok], text, stepMs, batchSize };
    if (why) {
      final.finishReason = why;
      break;
    }
    if (final.completionTokens >= p.maxTokens) {
      final.finishReason = "length";
      break;
    }
    if (s.contextTokens + 1 > s.maxContextTokens) {
      final.finishReason = "context_full";
      break;
    }
    if (p.signal?.aborted) {
      final.finishReason = "cancelled";
      break;
    }
    draw = sampler.greedy ? undefined : sampler.draw();
    const r = await scheduler.step(s.session, tok, s.contextTokens, sampler.greedy, draw);
    s.contextTokens++;
    s.pendingToken = undefined;
    s.onAppended?.(s.contextTokens);
    logits = r.logits;
    picked = r.token;
    stepMs = r.stepMs;
    batchSize = r.batchSize;
    final.decodeMs += r.stepMs;
    final.maxBatchSize = Math.max(final.maxBatchSize, r.batchSize);
  }
  if (final.finishReason !== "stop_string") {
    const rest = stop.flush(final.finishReason === "stop_token" ? final.tokens.slice(0, -1) : final.tokens);
    if (rest) yield { tokenIds: [], text: rest, stepMs: 0, batchSize };
  }
  final.contextTokens = s.contextTokens;
  return final;
}
