/**
 * Engine test harness: host segments of sessions of the in-process kvstore (attachLocalHost, as
 * the command line and the fidelity harness get theirs; released by dispose), and the mapping
 * from the reference's config names to the binding's enums (the one table, RETRIEVAL_NAMES).
 */
import { loadAddon, type Engine, type Geometry, type HostSegments, type Retrieval } from "../../../native/binding.js";
import { RETRIEVAL_NAMES as N } from "../../../services/common/retrieval.js";
import { attachLocalHost } from "../../../services/compute/model/localHost.js";
import { ReferenceLayer, type PolicyConfig } from "../../../tools/reference/policy.js";
import type { SummaryKindName } from "../../../tools/reference/summary.js";

/** The reference's summary and dtype names (its own spelling) to the binding's enums. */
export const SUMMARY: Record<SummaryKindName, Retrieval["summary"]> = { maxmin: N.summary.max_min, cuboid: N.summary.cuboid_mean };
export const DTYPE: Record<PolicyConfig["dtype"], Geometry["kvDtype"]> = { f32: N.kvDtype.float32, bf16: N.kvDtype.bfloat16 };

export function geometryOf(c: PolicyConfig, layers = 1): Geometry {
  return { layers, qHeads: c.qHeads, kvHeads: c.kvHeads, headDim: c.headDim, kvDtype: DTYPE[c.dtype] };
}

export function retrievalOf(c: PolicyConfig, extra: Partial<Retrieval> = {}): Retrieval {
  return {
    pageSize: c.pageSize,
    sinkTokens: c.sinkTokens,
    windowTokens: c.windowTokens,
    selectTokens: c.selectTokens,
    tau: c.tau,
    summary: SUMMARY[c.summary],
    combine: N.combine[c.combine],
    mode: N.mode[c.mode],
    recall: N.recall.gather,
    denseLayers: [],
    ...extra,
  };
}

export interface Host {
  segments: HostSegments;
  /** Unmaps the segments and releases the kvstore session (close engine sessions over it first). */
  dispose(): Promise<void>;
}

/** A kvstore session's four segments (with a copy of another host's contents if given). */
export function createHost(geometry: Geometry, retrieval: Retrieval, capacityPages: number, copyFrom?: Host): Host {
  const local = attachLocalHost(geometry, retrieval, capacityPages, "test");
  if (copyFrom)
    for (const k of ["store", "staging", "tail", "manifest"] as const)
      new Uint8Array(local.host[k].buffer()).set(new Uint8Array(copyFrom.segments[k].buffer()));
  return { segments: local.host, dispose: () => local.release() };
}

export interface EngineSession {
  engine: Engine;
  session: number;
  host: Host;
  close(): Promise<void>;
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
      return host.dispose();
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

/**
 * One session per config on `engine` (`layers` layers, its own host), each beside float64
 * reference layers, every layer prefilled with the same `tokens` random quantised K/V as its
 * reference. `retrieval(i)`: extra retrieval fields of config i (e.g. its recall path).
 */
export async function prefilledSessions(
  engine: Engine,
  configs: PolicyConfig[],
  layers: number,
  rng: { normal(): number },
  tokens: number,
  retrieval: (i: number) => Partial<Retrieval> = () => ({}),
): Promise<{ sessions: number[]; refs: ReferenceLayer[][]; close(): Promise<void> }> {
  const hosts = configs.map((c, i) => createHost(geometryOf(c, layers), retrievalOf(c, retrieval(i)), 64));
  const sessions: number[] = [];
  const close = async () => {
    for (const s of sessions) engine.closeSession(s);
    for (const h of hosts) await h.dispose();
  };
  try {
    configs.forEach((c, i) => sessions.push(engine.createSession(geometryOf(c, layers), retrievalOf(c, retrieval(i)), hosts[i].segments, false)));
    const refs = configs.map((c) => Array.from({ length: layers }, () => new ReferenceLayer(c)));
    for (const [i, s] of sessions.entries())
      for (let l = 0; l < layers; l++) {
        const kvn = configs[i].kvHeads * configs[i].headDim;
        const k = quantised(rng, tokens * kvn),
          v = quantised(rng, tokens * kvn);
        await engine.prefill(s, l, k, v, tokens);
        refs[i][l].prefill(k, v, tokens);
      }
    return { sessions, refs, close };
  } catch (e) {
    await close();
    throw e;
  }
}
