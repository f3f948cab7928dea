/**
 * Stop conditions and streamed text. Text is detokenized incrementally: each step decodes only
 * the tokens since a recent offset (with a few earlier tokens as context, so that decoders that
 * treat a sequence's first token specially and multi-token UTF-8 characters come out as in a full
 * decode), never the whole generation again. What is streamed holds back an incomplete
 * character and any tail that could still become a stop string, so a stop string never reaches
 * the client.
 */
export type StopReason = "stop_token" | "stop_string" | undefined;

/**
 * What a request may ask to stop on (gRPC and the OpenAI front): every stop string is matched
 * against the text after every token, so their number and length bound the work each token adds
 * to the event loop; a gRPC message may otherwise carry megabytes of them.
 */
export const STOP_LIMITS = { strings: 16, stringBytes: 256, tokenIds: 1024 } as const;

/** Why the stop conditions are refused, naming the field (as `field: why`), or undefined when they are within STOP_LIMITS. */
export function stopProblem(stopStrings: readonly string[], stopTokenIds: readonly number[]): { field: string; why: string } | undefined {
  if (stopStrings.length > STOP_LIMITS.strings) return { field: "stop_strings", why: `takes at most ${STOP_LIMITS.strings} strings, got ${stopStrings.length}` };
  for (const [i, x] of stopStrings.entries()) {
    const n = Buffer.byteLength(x, "utf8");
    if (n > STOP_LIMITS.stringBytes) return { field: `stop_strings[${i}]`, why: `is ${n} bytes; at most ${STOP_LIMITS.stringBytes}` };
  }
  if (stopTokenIds.length > STOP_LIMITS.tokenIds) return { field: "stop_token_ids", why: `takes at most ${STOP_LIMITS.tokenIds} ids, got ${stopTokenIds.length}` };
  return undefined;
}

/** Tokens whose text may be held back waiting for the rest of a character (a UTF-8 character is at most 4 bytes). */
const MAX_HELD_TOKENS = 16;

export class StopMatcher {
  /** Text decoded so far (complete characters only). */
  private text = "";
  /** Characters of `text` already returned. */
  private emitted = 0;
  // Incremental detokenization (as in vLLM): ids[prefix, read) were decoded already and serve as
  // context for the tokens after `read`.
  private prefix = 0;
  private read = 0;

  constructor(
    private readonly stopTokens: Set<number>,
    private readonly stopStrings: string[],
    private readonly decode: ((ids: number[]) => string) | undefined,
  ) {}

  /** Decodes the ids not decoded yet (ids is the whole generation so far). */
  private advance(ids: number[]): void {
    if (!this.decode) return;
    const before = this.decode(ids.slice(this.prefix, this.read));
    const after = this.decode(ids.slice(this.prefix));
    const grew = after.length > before.length;
    // Held back while the last character may be incomplete, but not for ever: a run of tokens that
    // decode to nothing (skipped special tokens) or to bytes that never complete a character would
    // otherwise be decoded again whole at every step (quadratic in the run's length).
    const incomplete = after.endsWith("\uFFFD") && ids.length - this.read <= MAX_HELD_TOKENS;
    if (grew && !incomplete) this.text += after.slice(before.length);
    if ((grew && !incomplete) || (!grew && !after.endsWith("\uFFFD")) || ids.length - this.read > MAX_HELD_TOKENS) {
      this.prefix = Math.max(this.read, ids.length - 4);
      this.read = ids.length;
    }
  }

  /**
   * Takes the generated ids so far (the newest last); returns the text that can be streamed now
   * and whether generation stops. A stop token is not part of the text.
   */
  push(ids: number[]): { text: string; stop: StopReason } {
    const last = ids[ids.length - 1];
    if (this.stopTokens.has(last)) return { text: this.flush(ids.slice(0, -1)), stop: "stop_token" };
    if (!this.decode) return { text: "", stop: undefined };
    this.advance(ids);
    for (const s of this.stopStrings) {
      const at = this.text.indexOf(s, Math.max(0, this.emitted - s.length + 1));
      if (s && at >= 0) {
        const out = this.text.slice(this.emitted, at);
        this.emitted = at;
        return { text: out, stop: "stop_string" };
      }
    }
    let safe = this.text.length;
    for (const s of this.stopStrings) {
      for (let k = Math.min(s.length - 1, this.text.length); k > 0; k--) {
        if (this.text.endsWith(s.slice(0, k))) {
          safe = Math.min(safe, this.text.length - k);
          break;
        }
      }
    }
    if (safe <= this.emitted) return { text: "", stop: undefined };
    const out = this.text.slice(this.emitted, safe);
    this.emitted = safe;
    return { text: out, stop: undefined };
  }

  /** Everything not yet streamed (at the end of generation), incomplete characters included. */
  flush(ids: number[]): string {
    if (!this.decode) return "";
    if (ids.length > this.read) {
      const before = this.decode(ids.slice(this.prefix, this.read));
      const after = this.decode(ids.slice(this.prefix));
      if (after.length > before.length) this.text += after.slice(before.length);
      this.read = ids.length;
    }
    const out = this.text.slice(this.emitted);
    this.emitted = this.text.length;
    return out;
  }
}
