/**
 * Next-token sampling: greedy at temperature 0, otherwise softmax(logits / T) restricted by top-k
 * and then by top-p (the smallest set of most likely tokens whose mass reaches p), drawn with a
 * seeded generator so that a request with a seed is reproducible.
 */
export interface SamplingOptions {
  temperature: number;
  topP: number;
  topK: number;
  /** 0 = a random seed. */
  seed: number | bigint;
}

/** splitmix64: small, seedable, good enough for sampling. */
export class SeededRandom {
  private state: bigint;
  constructor(seed: bigint) {
    this.state = BigInt.asUintN(64, seed);
  }
  /** Uniform in [0, 1). */
  next(): number {
    this.state = BigInt.asUintN(64, this.state + 0x9e3779b97f4a7c15n);
    let z = this.state;
    z = BigInt.asUintN(64, (z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n);
    z = BigInt.asUintN(64, (z ^ (z >> 27n)) * 0x94d049bb133111ebn);
    z = z ^ (z >> 31n);
    return Number(z >> 11n) / 2 ** 53;
  }
}

export function validateSampling(s: SamplingOptions): string | undefined {
  if (!Number.isFinite(s.temperature) || s.temperature < 0) return `sampling.temperature must be >= 0, got ${s.temperature}`;
  if (!Number.isFinite(s.topP) || s.topP < 0 || s.topP > 1) return `sampling.top_p must be in [0, 1], got ${s.topP}`;
  if (!Number.isInteger(s.topK) || s.topK < 0) return `sampling.top_k must be an integer >= 0, got ${s.topK}`;
  return undefined;
}

export function argmax(logits: Float32Array, offset = 0, n = logits.length - offset): number {
  let best = 0;
  for (let i = 1; i < n; i++) if (logits[offset + i] > logits[offset + best]) best = i;
  return best;
}

export class Sampler {
  private readonly rng: SeededRandom;
  constructor(private readonly opts: SamplingOptions) {
    const seed = BigInt(opts.seed || 0);
    this.rng = new SeededRandom(seed !== 0n ? seed : BigInt(Math.floor(Math.random() * 2 ** 52)));
  }

  get greedy(): boolean {
    return this.opts.temperature === 0;
  }

  /** Picks a token from one row of logits [vocab] at `offset`. */
  sample(logits: Float32Array, offset: number, vocab: number): number {
    if (this.greedy) return argmax(logits, offset, vocab);
    const { temperature, topK, topP } = this.opts;
    let max = -Infinity;
    for (let i = 0; i < vocab; i++) max = Math.max(max, logits[offset + i]);
    // Tokens more than 40 temperatures below the best have probability ratios under e^-40: they
    // are left out, so a large vocabulary is neither sorted nor summed in full.
    const cut = max - 40 * temperature;
    let ids: number[] = [];
    for (let i = 0; i < vocab; i++) if (logits[offset + i] >= cut) ids.push(i);
    if (topK > 0 || (topP > 0 && topP < 1)) ids.sort((a, b) => logits[offset + b] - logits[offset + a]);
    if (topK > 0 && topK < ids.length) ids = ids.slice(0, topK);
    const p = ids.map((i) => Math.exp((logits[offset + i] - max) / temperature));
    let sum = p.reduce((a, b) => a + b, 0);
    let keep = p.length;
    if (topP > 0 && topP < 1) {
      let acc = 0;
      for (let i = 0; i < p.length; i++) {
        acc += p[i] / sum;
        if (acc >= topP) {
          keep = i + 1;
          break;
        }
      }
      sum = p.slice(0, keep).reduce((a, b) => a + b, 0);
    }
    let r = this.rng.next() * sum;
    for (let i = 0; i < keep; i++) {
      r -= p[i];
      if (r < 0) return ids[i];
    }
    return ids[keep - 1];
  }
}
