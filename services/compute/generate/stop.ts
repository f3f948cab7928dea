/**
 * Stop conditions and streamed text. Text is re-decoded from all generated ids each step (a
 * token can end in the middle of a UTF-8 sequence or change how the previous one decodes); what
 * is streamed holds back an incomplete character and any tail that could still become a stop
 * string, so a stop string never reaches the client.
 */
export type StopReason = "stop_token" | "stop_string" | undefined;

export class StopMatcher {
  private emitted = 0;
  private text = "";
  constructor(
    private readonly stopTokens: Set<number>,
    private readonly stopStrings: string[],
    private readonly decode: ((ids: number[]) => string) | undefined,
  ) {}

  /**
   * Takes the generated ids so far (the newest last); returns the text that can be streamed now
   * and whether generation stops. A stop token is not part of the text.
   */
  push(ids: number[]): { text: string; stop: StopReason } {
    const last = ids[ids.length - 1];
    if (this.stopTokens.has(last)) return { text: this.flush(ids.slice(0, -1)), stop: "stop_token" };
    if (!this.decode) return { text: "", stop: undefined };
    this.text = this.decode(ids);
    for (const s of this.stopStrings) {
      const at = this.text.indexOf(s, Math.max(0, this.emitted - s.length + 1));
      if (s && at >= 0) {
        const out = this.text.slice(this.emitted, at);
        this.emitted = at;
        return { text: out, stop: "stop_string" };
      }
    }
    let safe = this.text.length;
    if (this.text.endsWith("\uFFFD")) safe--;
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

  /** Everything not yet streamed (at the end of generation). */
  flush(ids: number[]): string {
    if (!this.decode) return "";
    this.text = this.decode(ids);
    const out = this.text.slice(this.emitted);
    this.emitted = this.text.length;
    return out;
  }
}
