/**
 * What a fidelity replay drives: one session of one retrieval mode over one layer. The native
 * engine (native-target.ts) and the float64 policy model (policy-model.ts) both implement it, so
 * the harness, its metrics and its tests do not depend on which one answers.
 */
export interface ReplayCounters {
  /** Bytes recalled from the host tier so far. */
  recallBytes: number;
  /** (step, KV head) groups re-selected synchronously by correction so far. */
  corrections: number;
}

export interface ReplayTarget {
  /** Appends tokens 0..n-1: k, v are [n][Hkv][D]. */
  prefill(k: Float32Array, v: Float32Array, n: number): Promise<void>;
  /** One decode step: appends k/v ([Hkv][D]) and attends with q ([Hq][D]); returns [Hq][D]. */
  decode(q: Float32Array, k: Float32Array, v: Float32Array): Promise<ArrayLike<number>>;
  /** Sorted token positions attended at the latest step for one KV head. */
  attended(kvHead: number): ArrayLike<number>;
  counters(): ReplayCounters;
  close(): Promise<void>;
}
