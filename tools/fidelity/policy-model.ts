/**
 * `freekv fidelity --engine model`: the float64 reference of the FreeKV policy
 * (tools/reference/policy.ts, DESIGN.md section 2) driven as a replay target, so the harness can
 * check itself and calibrate traces without the native engine. The same reference is what the
 * engine tests compare the CPU and CUDA engines against.
 *
 * The harness's settings carry no summary, combine or dtype: the model uses the engine's
 * defaults (max/min summaries, softmax-mean group combine) and the given storage dtype.
 */
import { ReferenceLayer } from "../reference/policy.js";
import type { ModeName, RetrievalSettings } from "./modes.js";
import type { ReplayCounters, ReplayTarget } from "./replay-target.js";

export interface ModelGeometry {
  qHeads: number;
  kvHeads: number;
  headDim: number;
  /** Tokens the session will hold (prefill + steps). */
  capacityTokens: number;
}

export class PolicyModel implements ReplayTarget {
  private readonly layer: ReferenceLayer;
  private last: number[][] = [];
  private readonly pageBytes: number;

  constructor(geo: ModelGeometry, cfg: RetrievalSettings, mode: ModeName, dtype: "f32" | "bf16" = "f32") {
    this.layer = new ReferenceLayer({
      qHeads: geo.qHeads,
      kvHeads: geo.kvHeads,
      headDim: geo.headDim,
      ...cfg,
      summary: "maxmin",
      combine: "softmax_mean",
      mode,
      dtype,
    });
    // One recalled HND head-page: [2][P][D] elements.
    this.pageBytes = 2 * cfg.pageSize * geo.headDim * (dtype === "bf16" ? 2 : 4);
  }

  async prefill(k: Float32Array, v: Float32Array, n: number): Promise<void> {
    this.layer.prefill(k, v, n);
  }

  async decode(q: Float32Array, k: Float32Array, v: Float32Array): Promise<Float64Array> {
    const step = this.layer.decode(q, k, v);
    this.last = step.attended;
    return step.out;
  }

  attended(kvHead: number): Int32Array {
    return Int32Array.from(this.last[kvHead] ?? []);
  }

  counters(): ReplayCounters {
    const c = this.layer.counters;
    return { recallBytes: c.pagesRecalled * this.pageBytes, corrections: c.corrections };
  }

  async close(): Promise<void> {}
}
