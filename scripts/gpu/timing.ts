/**
 * Wall time of one engine.decode() call (one layer, whole batch) through the binding on the GPU
 * machine: inputs in, the step's device work, outputs out, N-API and promise included. This is
 * the engine's per-layer latency as the model runner sees it, not a kernel timing (the GPU
 * benchmark in bench/gpu/ times the kernels with CUDA events).
 * Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head dim 128), one layer, budget
 * 512 sink + 1024 selected + 512 window, page 32, bf16, queries drifting (adjacent cosine ~0.9).
 */
import { loadAddon, type Geometry, type Retrieval, type ShmSegment } from "../../native/binding.js";

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
  const geometry: Geometry = { layers: 1, qHeads: 32, kvHeads: 8, headDim: 128, kvDtype: 2 };
  const base: Retrieval = {
    pageSize: 32, sinkTokens: 512, windowTokens: 512, selectTokens: 1024, tau: 0.9,
    summary: 1, combine: 1, mode: 1, recall: 1, denseLayers: [],
  };
  const modes: [string, Partial<Retrieval>][] = [
    ["freekv gather", {}],
    ["freekv double-buffer", { recall: 2 }],
    ["oracle (blocking every step)", { mode: 3 }],
    ["dense (full attention)", { mode: 2 }],
  ];
  const qn = 32 * 128, kn = 8 * 128;
  const rows: TimingRow[] = [];
  let seg = 0;
  for (const context of contexts)
    for (const batch of batches)
      for (const [name, over] of modes) {
        const retrieval = { ...base, ...over };
        const cap = Math.ceil((context + 64) / 32) + 1;
        const L = addon.layout(geometry, retrieval, cap);
        const engine = new addon.Engine({ backend });
        const segs: ShmSegment[] = [];
        const names: string[] = [];
        const sessions: number[] = [];
        try {
          for (let b = 0; b < batch; b++) {
            const mk = (k: string, size: number) => {
              const n = `/fkv-timing-${process.pid}-${seg++}-${k}`;
              names.push(n);
              const s = addon.ShmSegment.create(n, size);
              segs.push(s);
              return s;
            };
            const host = {
              store: mk("store", L.storeBytes), staging: mk("staging", 2 * L.stagingBufferBytes),
              tail: mk("tail", L.tailBytes), manifest: mk("manifest", L.manifestBytes), capacityPages: cap,
            };
            const s = engine.createSession(geometry, retrieval, host, false);
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
          for (const s of sessions) engine.closeSession(s);
          for (const s of segs) s.close();
          for (const n of names) addon.ShmSegment.unlink(n);
        }
      }
  return rows;
}
