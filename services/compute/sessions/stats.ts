/**
 * freekv.v1.RetrievalStats from the engine's counters of one session (native/binding.ts
 * EngineStats), with the per-layer dynamics (native/src/engine/RetrievalStats.h).
 */
import type { EngineStats, LayerEngineStats } from "../../../native/binding.js";
import type { LayerRetrievalStats, RetrievalStats } from "../../../proto/gen/freekv/v1/common.js";

const ratio = (a: number, b: number) => (b ? a / b : 0);

export function layerRetrievalStats(layer: number, l: LayerEngineStats): LayerRetrievalStats {
  return {
    layer,
    selections: l.selections,
    corrections: l.corrections,
    correctionRate: ratio(l.corrections, l.selections),
    pagesSelected: l.pagesSelected,
    pagesHit: l.pagesHit,
    pagesRecalled: l.pagesRecalled,
    hitRate: ratio(l.pagesHit, l.pagesSelected),
    cosineSamples: l.cosineSamples,
    cosineSum: l.cosineSum,
    cosineSumSq: l.cosineSumSq,
    cosineMean: ratio(l.cosineSum, l.cosineSamples),
    cosineMin: l.cosineMin,
    cosineHistogram: [...l.cosineHistogram],
    cosineBelowTau: l.cosineBelowTau,
    overlapPages: l.overlapPages,
    overlapBase: l.overlapBase,
    overlap: ratio(l.overlapPages, l.overlapBase),
  };
}

/** `edges`: the addon's cosineBucketEdges(). */
export function retrievalStats(st: EngineStats, edges: readonly number[]): RetrievalStats {
  return {
    decodeSteps: st.decodeSteps,
    selections: st.selections,
    corrections: st.corrections,
    correctionRate: ratio(st.corrections, st.selections),
    pagesSelected: st.pagesSelected,
    pagesHit: st.pagesHit,
    pagesRecalled: st.pagesRecalled,
    recallBytes: st.recallBytes,
    pagesOffloaded: st.pagesOffloaded,
    offloadBytes: st.offloadBytes,
    hitRate: ratio(st.pagesHit, st.pagesSelected),
    layers: st.layers.map((l, i) => layerRetrievalStats(i, l)),
    cosineBucketEdges: [...edges],
  };
}
