/**
 * Wall time of one engine.decode() call (one layer, whole batch) through the binding on the GPU
 * machine: inputs in, the step's device work, outputs out, N-API and promise included. This is
 * the engine's per-layer latency as the model runner sees it, not a kernel timing (the GPU
 * benchmark in bench/gpu/ times the kernels with CUDA events).
 * Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head dim 128), one layer, budget
 * 512 sink + 1024 selected + 512 window, page 32, bf16, queries drifting (adjacent cosine ~0.9).
 */
import { loadAddon, type Geometry, type Retrieval } from "../../native/binding.js";
import { RETRIEVAL_NAMES as N } from "../../services/common/retrieval.js";
import { createLocalSession, type LocalSession } from "../../services/compute/model/localHost.js";

export interface TimingRow {
  mode: string;
  context: number;
  batch: number;
  msPerCall: number;
  p90: number;
  corrections: number;
  recalledPerCall: number;
}

function fill(a: Float32Array, seed: number, scale = 1, mean = 0): Float32Array {
  let x = seed >>> 0 || 1;
  for (let i = 0; i < a.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    a[i] = mean + scale * (((x >>> 0) / 4294967296) * 3.4641 - 1.7320); // unit variance
  }
  return a;
}

export async function runTiming(log: (l: string) => void, contexts = [32768], batches = [1, 4], backend: "cuda" | "cpu" = "cuda"): Promise<TimingRow[]> {
  const addon = loadAddon();
  const geometry: Geometry = { layers: 1, qHeads: 32, kvHeads: 8, headDim: 128, kvDtype: N.kvDtype.bfloat16 };
  const base: Retrieval = {
    pageSize: 32, sinkTokens: 512, windowTokens: 512, selectTokens: 1024, tau: 0.9,
    summary: N.summary.max_min, combine: N.combine.softmax_mean, mode: N.mode.freekv, recall: N.recall.gather, denseLayers: [],
  };
  const modes: [string, Partial<Retrieval>][] = [
    ["freekv gather", {}],
    ["freekv double-buffer", { recall: N.recall.double_buffer }],
    ["oracle (blocking every step)", { mode: N.mode.oracle }],
    ["dense (full attention)", { mode: N.mode.dense }],
  ];
  const qn = 32 * 128, kn = 8 * 128;
  const rows: TimingRow[] = [];
  for (const context of contexts)
    for (const batch of batches)
      for (const [name, over] of modes) {
        const retrieval = { ...base, ...over };
        const engine = new addon.Engine({ backend });
        const locals: LocalSession[] = [];
        const sessions: number[] = [];
        try {
          for (let b = 0; b < batch; b++) {
            // A session of the in-process kvstore: its segments hold context + 64 tokens and a page more.
            const local = createLocalSession(engine, geometry, retrieval, context + 64);
            locals.push(local);
            const s = local.session;
            sessions.push(s);
            const chunk = 8192;
            for (let t = 0; t < context; t += chunk) {
              const n = Math.min(chunk, context - t);
              await engine.prefill(s, 0, fill(new Float32Array(n * kn), 7 + t + b, 1, 0.1), fill(new Float32Array(n * kn), 11 + t + b), n);
            }
          }
          let q = sessions.map((_, b) => fill(new Float32Array(qn), 99 + b));
          const times: number[] = [];
          const steps = 40, warm = 8;
          for (let t = 0; t < steps; t++) {
            q = q.map((prev, b) => {
              const noise = fill(new Float32Array(qn), 1000 * t + b + 5);
              const next = new Float32Array(qn);
              for (let i = 0; i < qn; i++) next[i] = 0.92 * prev[i] + 0.35 * noise[i];
              return next;
            });
            const items = sessions.map((s, b) => ({
              session: s, q: q[b],
              k: fill(new Float32Array(kn), 77 * t + b + 1, 1, 0.1), v: fill(new Float32Array(kn), 91 * t + b + 3),
            }));
            const t0 = process.hrtime.bigint();
            const outs = await engine.decode(0, items);
            const dt = Number(process.hrtime.bigint() - t0) / 1e6;
            if (outs.some((o) => o.some((x) => !Number.isFinite(x)))) throw new Error(`${name}: non-finite output`);
            if (t >= warm) times.push(dt);
          }
          times.sort((a, b) => a - b);
          let corrections = 0, recalled = 0;
          for (const s of sessions) {
            await engine.sync(s);
            const st = engine.stats(s);
            corrections += st.corrections;
            recalled += st.pagesRecalled;
          }
          const row = {
            mode: name, context, batch, msPerCall: times[Math.floor(times.length / 2)],
            p90: times[Math.floor(times.length * 0.9)], corrections, recalledPerCall: recalled / steps,
          };
          rows.push(row);
          log(`timing ${name} ctx ${context} batch ${batch}: ${row.msPerCall.toFixed(3)} ms/call (p90 ${row.p90.toFixed(3)})`);
        } finally {
          for (const l of locals) await l.close();
        }
      }
  return rows;
}
