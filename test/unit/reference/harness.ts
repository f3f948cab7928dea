/**
 * Engine test harness: host segments made with ShmSegment.create + Engine.layout (unique names,
 * unlinked by dispose), and the mapping from the reference's config names to the binding's enums.
 */
import { loadAddon, type Engine, type Geometry, type HostSegments, type Retrieval, type ShmSegment } from "../../../native/binding.js";
import type { PolicyConfig } from "../../../tools/reference/policy.js";

export const MODE = { freekv: 1, dense: 2, oracle: 3, speculative: 4, sink_window: 5 } as const;
export const SUMMARY = { maxmin: 1, cuboid: 2 } as const;
export const COMBINE = { softmax_mean: 1, mean: 2, max: 3 } as const;
export const DTYPE = { f32: 1, bf16: 2 } as const;

export function geometryOf(c: PolicyConfig, layers = 1): Geometry {
  return { layers, qHeads: c.qHeads, kvHeads: c.kvHeads, headDim: c.headDim, kvDtype: DTYPE[c.dtype] as Geometry["kvDtype"] };
}

export function retrievalOf(c: PolicyConfig, extra: Partial<Retrieval> = {}): Retrieval {
  return {
    pageSize: c.pageSize,
    sinkTokens: c.sinkTokens,
    windowTokens: c.windowTokens,
    selectTokens: c.selectTokens,
    tau: c.tau,
    summary: SUMMARY[c.summary] as Retrieval["summary"],
    combine: COMBINE[c.combine] as Retrieval["combine"],
    mode: MODE[c.mode] as Retrieval["mode"],
    recall: 1 as Retrieval["recall"],
    denseLayers: [],
    ...extra,
  };
}

let counter = 0;

export interface Host {
  segments: HostSegments;
  names: string[];
  dispose(): void;
}

/** Creates the four segments of a session (or copies of another host's contents). */
export function createHost(geometry: Geometry, retrieval: Retrieval, capacityPages: number, copyFrom?: Host): Host {
  const addon = loadAddon();
  const L = addon.layout(geometry, retrieval, capacityPages);
  const base = `/fkv-test-${process.pid}-${Date.now().toString(36)}-${counter++}`;
  const sizes = { store: L.storeBytes, staging: 2 * L.stagingBufferBytes, tail: L.tailBytes, manifest: L.manifestBytes };
  const segs: Record<string, ShmSegment> = {};
  const names: string[] = [];
  for (const [k, size] of Object.entries(sizes)) {
    const name = `${base}-${k}`;
    segs[k] = addon.ShmSegment.create(name, size);
    names.push(name);
    if (copyFrom) {
      const src = (copyFrom.segments as unknown as Record<string, ShmSegment>)[k];
      new Uint8Array(segs[k].buffer()).set(new Uint8Array(src.buffer()));
    }
  }
  return {
    segments: { store: segs.store, staging: segs.staging, tail: segs.tail, manifest: segs.manifest, capacityPages },
    names,
    dispose() {
      for (const s of Object.values(segs)) s.close();
      for (const n of names) addon.ShmSegment.unlink(n);
    },
  };
}

export interface EngineSession {
  engine: Engine;
  session: number;
  host: Host;
  close(): void;
}

export function openSession(
  c: PolicyConfig,
  opts: { layers?: number; capacityPages?: number; retrieval?: Partial<Retrieval>; threads?: number; debugRecallDelayMs?: number; engine?: Engine } = {},
): EngineSession {
  const addon = loadAddon();
  const g = geometryOf(c, opts.layers ?? 1);
  const r = retrievalOf(c, opts.retrieval);
  const host = createHost(g, r, opts.capacityPages ?? 256);
  const engine = opts.engine ?? new addon.Engine({ backend: "cpu", threads: opts.threads ?? 2, debugRecallDelayMs: opts.debugRecallDelayMs });
  const session = engine.createSession(g, r, host.segments, false);
  return {
    engine,
    session,
    host,
    close() {
      engine.closeSession(session);
      host.dispose();
    },
  };
}

/** Normals rounded to multiples of 1/4: float32 sums of their products are exact, so the
 *  engine's float32 page scores equal the float64 reference's and selections compare exactly. */
export function quantised(rng: { normal(): number }, n: number, scale = 1): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = Math.round(rng.normal() * 4 * scale) / 4;
  return a;
}
