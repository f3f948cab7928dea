/**
 * A fidelity session on the native engine: one engine session per mode, one layer, over host
 * segments created for it. Mode names map to the engine's Mode enum; the retrieval settings are
 * the command line's, with the defaults of DESIGN.md for everything else (max/min summaries,
 * softmax-mean group combine, gather recall, no dense layers).
 */
import type { Addon, Engine, Geometry, Retrieval } from "../../native/binding.js";
import { RETRIEVAL_NAMES, retrievalDefaults } from "../../services/common/retrieval.js";
import { createHostSegments, type OwnedSegments } from "./host-segments.js";
import type { ModeName, RetrievalSettings } from "./modes.js";
import type { ReplayCounters, ReplayTarget } from "./replay-target.js";

export interface NativeTargetOptions {
  qHeads: number;
  kvHeads: number;
  headDim: number;
  /** Tokens the session will hold. */
  capacityTokens: number;
  settings: RetrievalSettings;
  /** KV storage type of the engine's tiers. */
  kvDtype?: "f32" | "bf16";
  /** Recall path: "gather" (default) or "double_buffer". */
  recall?: "gather" | "double_buffer";
}

export class NativeTarget implements ReplayTarget {
  private constructor(
    private readonly engine: Engine,
    private readonly session: number,
    private readonly segments: OwnedSegments,
  ) {}

  static create(addon: Addon, engine: Engine, mode: ModeName, o: NativeTargetOptions): NativeTarget {
    const geometry: Geometry = { layers: 1, qHeads: o.qHeads, kvHeads: o.kvHeads, headDim: o.headDim, kvDtype: o.kvDtype === "bf16" ? RETRIEVAL_NAMES.kvDtype.bfloat16 : RETRIEVAL_NAMES.kvDtype.float32 };
    const retrieval: Retrieval = {
      ...retrievalDefaults(),
      pageSize: o.settings.pageSize,
      sinkTokens: o.settings.sinkTokens,
      windowTokens: o.settings.windowTokens,
      selectTokens: o.settings.selectTokens,
      tau: o.settings.tau,
      mode: RETRIEVAL_NAMES.mode[mode],
      recall: RETRIEVAL_NAMES.recall[o.recall ?? "gather"],
      denseLayers: [],
    };
    const capacityPages = Math.ceil(o.capacityTokens / o.settings.pageSize) + 1;
    const segments = createHostSegments(addon, geometry, retrieval, capacityPages);
    try {
      const session = engine.createSession(geometry, retrieval, segments.host, false);
      return new NativeTarget(engine, session, segments);
    } catch (e) {
      segments.release();
      throw e;
    }
  }

  async prefill(k: Float32Array, v: Float32Array, n: number): Promise<void> {
    await this.engine.prefill(this.session, 0, k, v, n);
  }

  async decode(q: Float32Array, k: Float32Array, v: Float32Array): Promise<Float32Array> {
    const [out] = await this.engine.decode(0, [{ session: this.session, q, k, v }]);
    return out;
  }

  attended(kvHead: number): Int32Array {
    return this.engine.lastAttendedTokens(this.session, 0, kvHead);
  }

  counters(): ReplayCounters {
    const s = this.engine.stats(this.session);
    return { recallBytes: s.recallBytes, corrections: s.corrections };
  }

  async close(): Promise<void> {
    try {
      await this.engine.sync(this.session);
      this.engine.closeSession(this.session);
    } finally {
      this.segments.release();
    }
  }
}
