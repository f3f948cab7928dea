/** The filler corpus: sentences of natural text, read from a file with one paragraph per line. */
import { readFileSync } from "node:fs";
import type { Rng } from "./rng.js";

export class Filler {
  /** Sentences in corpus order. */
  readonly sentences: string[] = [];
  /** paragraphEnd[i]: sentence i closes its paragraph. */
  readonly paragraphEnd: boolean[] = [];

  constructor(text: string) {
    for (const line of text.split("\n")) {
      const p = line.trim();
      if (!p) continue;
      const parts = p.split(/(?<=[.!?]["')]?)\s+(?=["'(]?[A-Z0-9])/);
      parts.forEach((s, i) => {
        this.sentences.push(s);
        this.paragraphEnd.push(i === parts.length - 1);
      });
    }
    if (this.sentences.length < 2) throw new Error("filler corpus has fewer than 2 sentences");
  }

  static fromFile(file: string): Filler {
    return new Filler(readFileSync(file, "utf8"));
  }

  /**
   * Consecutive sentences from a random place (wrapping at the end) adding up to at least `chars`
   * characters with their separators. Returns the sentences and each one's separator after it.
   */
  take(rng: Rng, chars: number): { text: string[]; sep: string[] } {
    const text: string[] = [];
    const sep: string[] = [];
    let i = rng.int(0, this.sentences.length - 1);
    let n = 0;
    while (n < chars) {
      const s = this.sentences[i];
      const e = this.paragraphEnd[i] ? "\n" : " ";
      text.push(s);
      sep.push(e);
      n += s.length + 1;
      i = (i + 1) % this.sentences.length;
    }
    return { text, sep };
  }
}
