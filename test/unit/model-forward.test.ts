/**
 * The native forward pass against a float64 TypeScript reference written here (embeddings,
 * RMSNorm, q/k/v with bias, RoPE with linear and Llama-3 scaling, GQA causal attention, SwiGLU,
 * LM head), on seeded random models of architectures the golden fixtures do not cover
 * (Mistral with linear rope scaling and an untied head; Llama with q/k/v bias, tied embeddings,
 * Llama-3 scaling and a transformers-4 style config). Also: a batched decode step equals the
 * sessions' single steps, and the engine path equals the model's dense path.
 */
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { loadAddon } from "../../native/binding.js";
import { RETRIEVAL_NAMES } from "../../services/common/retrieval.js";
import { loadModel } from "../../services/compute/model/loader.js";
import { createLocalSession, modelGeometry } from "../../services/compute/model/localHost.js";
import { writeSafetensors, type TensorToWrite } from "../../services/compute/model/safetensors.js";
import { prng, randomF32 } from "../helpers/prng.js";

const dirs: string[] = [];
afterAll(() => dirs.forEach((d) => rmSync(d, { recursive: true, force: true })));

interface Shape {
  arch: "LlamaForCausalLM" | "MistralForCausalLM" | "Qwen2ForCausalLM";
  vocab: number;
  hidden: number;
  inter: number;
  layers: number;
  heads: number;
  kvHeads: number;
  headDim: number;
  theta: number;
  scaling?: { rope_type: "linear" | "llama3"; factor: number; low_freq_factor?: number; high_freq_factor?: number; original_max_position_embeddings?: number };
  tied: boolean;
  bias: boolean;
  eps: number;
}

type Weights = Record<string, Float32Array>;

function makeWeights(s: Shape, seed: number): Weights {
  const r = prng(seed);
  const w: Weights = {};
  const Q = s.heads * s.headDim, K = s.kvHeads * s.headDim;
  w["model.embed_tokens.weight"] = randomF32(s.vocab * s.hidden, r, 1);
  if (!s.tied) w["lm_head.weight"] = randomF32(s.vocab * s.hidden, r, 2 / Math.sqrt(s.hidden));
  w["model.norm.weight"] = randomF32(s.hidden, r, 0.1).map((x) => 1 + x);
  for (let l = 0; l < s.layers; l++) {
    const p = `model.layers.${l}.`;
    w[p + "input_layernorm.weight"] = randomF32(s.hidden, r, 0.1).map((x) => 1 + x);
    w[p + "post_attention_layernorm.weight"] = randomF32(s.hidden, r, 0.1).map((x) => 1 + x);
    w[p + "self_attn.q_proj.weight"] = randomF32(Q * s.hidden, r, 1 / Math.sqrt(s.hidden));
    w[p + "self_attn.k_proj.weight"] = randomF32(K * s.hidden, r, 1 / Math.sqrt(s.hidden));
    w[p + "self_attn.v_proj.weight"] = randomF32(K * s.hidden, r, 1 / Math.sqrt(s.hidden));
    w[p + "self_attn.o_proj.weight"] = randomF32(s.hidden * Q, r, 1 / Math.sqrt(Q));
    if (s.bias) {
      w[p + "self_attn.q_proj.bias"] = randomF32(Q, r, 0.2);
      w[p + "self_attn.k_proj.bias"] = randomF32(K, r, 0.2);
      w[p + "self_attn.v_proj.bias"] = randomF32(K, r, 0.2);
    }
    w[p + "mlp.gate_proj.weight"] = randomF32(s.inter * s.hidden, r, 1 / Math.sqrt(s.hidden));
    w[p + "mlp.up_proj.weight"] = randomF32(s.inter * s.hidden, r, 1 / Math.sqrt(s.hidden));
    w[p + "mlp.down_proj.weight"] = randomF32(s.hidden * s.inter, r, 1 / Math.sqrt(s.inter));
  }
  return w;
}

function shapeOf(s: Shape, name: string): number[] {
  const Q = s.heads * s.headDim, K = s.kvHeads * s.headDim;
  if (name.endsWith("embed_tokens.weight") || name === "lm_head.weight") return [s.vocab, s.hidden];
  if (name.endsWith("norm.weight")) return [s.hidden];
  if (name.endsWith("q_proj.weight")) return [Q, s.hidden];
  if (name.endsWith("k_proj.weight") || name.endsWith("v_proj.weight")) return [K, s.hidden];
  if (name.endsWith("o_proj.weight")) return [s.hidden, Q];
  if (name.endsWith("q_proj.bias")) return [Q];
  if (name.endsWith("k_proj.bias") || name.endsWith("v_proj.bias")) return [K];
  if (name.endsWith("down_proj.weight")) return [s.hidden, s.inter];
  return [s.inter, s.hidden];
}

/** Writes an HF folder; `style` picks the config spelling (4: rope_theta/rope_scaling, 5: rope_parameters). */
function writeFolder(s: Shape, w: Weights, style: 4 | 5): string {
  const dir = mkdtempSync(join(tmpdir(), "freekv-model-"));
  dirs.push(dir);
  const cfg: Record<string, unknown> = {
    architectures: [s.arch],
    vocab_size: s.vocab,
    hidden_size: s.hidden,
    intermediate_size: s.inter,
    num_hidden_layers: s.layers,
    num_attention_heads: s.heads,
    num_key_value_heads: s.kvHeads,
    head_dim: s.headDim,
    rms_norm_eps: s.eps,
    tie_word_embeddings: s.tied,
    attention_bias: s.bias,
    hidden_act: "silu",
  };
  if (style === 4) {
    cfg.rope_theta = s.theta;
    if (s.scaling) cfg.rope_scaling = s.scaling;
    cfg.torch_dtype = "float32";
  } else {
    cfg.rope_parameters = { rope_type: s.scaling?.rope_type ?? "default", rope_theta: s.theta, ...s.scaling };
    cfg.dtype = "float32";
  }
  writeFileSync(join(dir, "config.json"), JSON.stringify(cfg));
  const tensors: Record<string, TensorToWrite> = {};
  for (const [name, data] of Object.entries(w)) tensors[name] = { dtype: "F32", shape: shapeOf(s, name), data };
  writeSafetensors(join(dir, "model.safetensors"), tensors);
  return dir;
}

// ---------------------------------------------------------------------------------------------
// float64 reference

function refInvFreq(s: Shape): number[] {
  const half = s.headDim / 2;
  const inv = Array.from({ length: half }, (_, i) => 1 / Math.pow(s.theta, (2 * i) / s.headDim));
  const sc = s.scaling;
  if (!sc) return inv;
  if (sc.rope_type === "linear") return inv.map((x) => x / sc.factor);
  const low = sc.low_freq_factor!, high = sc.high_freq_factor!, old = sc.original_max_position_embeddings!;
  return inv.map((f) => {
    const wl = (2 * Math.PI) / f;
    if (wl < old / high) return f;
    if (wl > old / low) return f / sc.factor;
    const smooth = (old / wl - low) / (high - low);
    return (1 - smooth) * (f / sc.factor) + smooth * f;
  });
}

class Reference {
  private k: number[][][] = [];
  private v: number[][][] = [];
  private readonly inv: number[];
  constructor(
    private readonly s: Shape,
    private readonly w: Weights,
  ) {
    this.inv = refInvFreq(s);
    for (let l = 0; l < s.layers; l++) {
      this.k.push([]);
      this.v.push([]);
    }
  }
  private linear(x: number[], name: string, out: number, inp: number, bias?: string): number[] {
    const W = this.w[name];
    const b = bias ? this.w[bias] : undefined;
    const y = new Array<number>(out).fill(0);
    for (let o = 0; o < out; o++) {
      let acc = b ? b[o] : 0;
      for (let i = 0; i < inp; i++) acc += W[o * inp + i] * x[i];
      y[o] = acc;
    }
    return y;
  }
  private norm(x: number[], name: string): number[] {
    const ms = x.reduce((a, b) => a + b * b, 0) / x.length;
    const inv = 1 / Math.sqrt(ms + this.s.eps);
    return x.map((v, i) => v * inv * this.w[name][i]);
  }
  private rope(x: number[], heads: number, pos: number): number[] {
    const D = this.s.headDim, half = D / 2;
    const y = [...x];
    for (let h = 0; h < heads; h++)
      for (let i = 0; i < half; i++) {
        const a = x[h * D + i], b = x[h * D + i + half];
        const c = Math.cos(pos * this.inv[i]), sn = Math.sin(pos * this.inv[i]);
        y[h * D + i] = a * c - b * sn;
        y[h * D + i + half] = b * c + a * sn;
      }
    return y;
  }
  /** Feeds one token at the next position; returns its logits. */
  step(token: number): number[] {
    const s = this.s, H = s.hidden, D = s.headDim, Q = s.heads * D, K = s.kvHeads * D;
    const pos = this.k[0].length;
    let x = Array.from(this.w["model.embed_tokens.weight"].subarray(token * H, (token + 1) * H));
    for (let l = 0; l < s.layers; l++) {
      const p = `model.layers.${l}.`;
      const h = this.norm(x, p + "input_layernorm.weight");
      const q = this.rope(this.linear(h, p + "self_attn.q_proj.weight", Q, H, s.bias ? p + "self_attn.q_proj.bias" : undefined), s.heads, pos);
      const k = this.rope(this.linear(h, p + "self_attn.k_proj.weight", K, H, s.bias ? p + "self_attn.k_proj.bias" : undefined), s.kvHeads, pos);
      const v = this.linear(h, p + "self_attn.v_proj.weight", K, H, s.bias ? p + "self_attn.v_proj.bias" : undefined);
      this.k[l].push(k);
      this.v[l].push(v);
      const att = new Array<number>(Q).fill(0);
      const group = s.heads / s.kvHeads;
      for (let hq = 0; hq < s.heads; hq++) {
        const kh = Math.floor(hq / group);
        const scores = this.k[l].map((kk) => {
          let d = 0;
          for (let i = 0; i < D; i++) d += q[hq * D + i] * kk[kh * D + i];
          return d / Math.sqrt(D);
        });
        const m = Math.max(...scores);
        const e = scores.map((sc) => Math.exp(sc - m));
        const z = e.reduce((a, b) => a + b, 0);
        this.v[l].forEach((vv, t) => {
          for (let i = 0; i < D; i++) att[hq * D + i] += (e[t] / z) * vv[kh * D + i];
        });
      }
      const o = this.linear(att, p + "self_attn.o_proj.weight", H, Q);
      x = x.map((xi, i) => xi + o[i]);
      const h2 = this.norm(x, p + "post_attention_layernorm.weight");
      const g = this.linear(h2, p + "mlp.gate_proj.weight", s.inter, H);
      const u = this.linear(h2, p + "mlp.up_proj.weight", s.inter, H);
      const act = g.map((gi, i) => (gi / (1 + Math.exp(-gi))) * u[i]);
      const d = this.linear(act, p + "mlp.down_proj.weight", H, s.inter);
      x = x.map((xi, i) => xi + d[i]);
    }
    const f = this.norm(x, "model.norm.weight");
    return this.linear(f, s.tied ? "model.embed_tokens.weight" : "lm_head.weight", s.vocab, H);
  }
}

function relErr(got: Float32Array, offset: number, want: number[]): number {
  let num = 0, den = 0;
  for (let i = 0; i < want.length; i++) {
    num = Math.max(num, Math.abs(got[offset + i] - want[i]));
    den = Math.max(den, Math.abs(want[i]));
  }
  return num / den;
}

const MISTRAL: Shape = { arch: "MistralForCausalLM", vocab: 97, hidden: 48, inter: 80, layers: 3, heads: 6, kvHeads: 2, headDim: 8, theta: 10000, scaling: { rope_type: "linear", factor: 2.5 }, tied: false, bias: false, eps: 1e-5 };
const LLAMA_BIAS: Shape = {
  arch: "LlamaForCausalLM", vocab: 71, hidden: 32, inter: 64, layers: 2, heads: 4, kvHeads: 4, headDim: 8, theta: 5000,
  scaling: { rope_type: "llama3", factor: 4, low_freq_factor: 1, high_freq_factor: 2, original_max_position_embeddings: 32 },
  tied: true, bias: true, eps: 1e-6,
};

for (const [label, shape, style, seed] of [
  ["Mistral, linear rope scaling, GQA 3:1, untied (transformers 5 config)", MISTRAL, 5, 11],
  ["Llama with q/k/v bias, tied, Llama-3 scaling, MHA (transformers 4 config)", LLAMA_BIAS, 4, 12],
] as const) {
  describe(label, () => {
    const weights = makeWeights(shape, seed);
    const dir = writeFolder(shape, weights, style);
    const r = prng(seed + 100);
    const prompt = Array.from({ length: 45 }, () => Math.floor(r() * shape.vocab));
    const cont = Array.from({ length: 6 }, () => Math.floor(r() * shape.vocab));
    const ref = new Reference(shape, weights);
    const refLogits = [...prompt, ...cont].map((t) => ref.step(t));

    it("prefill (all positions, two chunks) and decode match the float64 reference", async () => {
      const { model } = loadModel(dir);
      const V = shape.vocab;
      const a = await model.prefill(3, Int32Array.from(prompt.slice(0, 20)), 0, true);
      const b = await model.prefill(3, Int32Array.from(prompt.slice(20)), 20, true);
      let worst = 0;
      for (let p = 0; p < 20; p++) worst = Math.max(worst, relErr(a, p * V, refLogits[p]));
      for (let p = 20; p < prompt.length; p++) worst = Math.max(worst, relErr(b, (p - 20) * V, refLogits[p]));
      for (let i = 0; i < cont.length; i++) {
        const l = await model.decode(Int32Array.of(3), Int32Array.of(cont[i]), Int32Array.of(prompt.length + i));
        worst = Math.max(worst, relErr(l, 0, refLogits[prompt.length + i]));
      }
      expect(worst).toBeLessThan(2e-5);
    });

    it("a batched decode step equals each session's own step", async () => {
      const { model } = loadModel(dir);
      const V = shape.vocab;
      const lens = [5, 17, 30];
      for (let i = 0; i < 3; i++) await model.prefill(10 + i, Int32Array.from(prompt.slice(0, lens[i])), 0, false);
      const toks = Int32Array.of(cont[0], cont[1], cont[2]);
      const batched = await model.decode(Int32Array.of(10, 11, 12), toks, Int32Array.from(lens));
      for (let i = 0; i < 3; i++) {
        await model.prefill(20 + i, Int32Array.from(prompt.slice(0, lens[i])), 0, false);
        const single = await model.decode(Int32Array.of(20 + i), Int32Array.of(toks[i]), Int32Array.of(lens[i]));
        let d = 0;
        for (let j = 0; j < V; j++) d = Math.max(d, Math.abs(single[j] - batched[i * V + j]));
        expect(d).toBeLessThanOrEqual(1e-6);
      }
    });

    it("runs on the CPU with a CPU engine or none; deviceWeights is checked", () => {
      const addon = loadAddon();
      const { model } = loadModel(dir);
      expect(model.device).toBe("cpu");
      expect(model.prefillWaveTokens).toBe(1); // chunk sizes do not matter that way on the CPU
      const folder = loadModel(dir);
      expect(() => new addon.Model({ config: folder.spec.native, tensors: folder.tensors, deviceWeights: "fp8" as never })).toThrow(/deviceWeights must be 'auto', 'bf16' or 'f32'/);
      const engine = new addon.Engine({ backend: "cpu", threads: 1 });
      expect(new addon.Model({ config: folder.spec.native, tensors: folder.tensors, engine, deviceWeights: "bf16" }).device).toBe("cpu");
    });

    it("decodeArgmax picks each row's argmax of the same step (the float64 reference's, away from ties)", async () => {
      const { model } = loadModel(dir);
      const lens = [7, 19, 33];
      for (let i = 0; i < 3; i++) {
        await model.prefill(40 + i, Int32Array.from(prompt.slice(0, lens[i])), 0, false);
        await model.prefill(50 + i, Int32Array.from(prompt.slice(0, lens[i])), 0, false);
      }
      const toks = Int32Array.from(lens.map((n) => prompt[n]));
      const logits = await model.decode(Int32Array.of(40, 41, 42), toks, Int32Array.from(lens));
      const picks = await model.decodeArgmax(Int32Array.of(50, 51, 52), toks, Int32Array.from(lens));
      expect(picks).toBeInstanceOf(Int32Array);
      expect(picks.length).toBe(3);
      const V = shape.vocab;
      for (let i = 0; i < 3; i++) {
        let best = 0;
        for (let j = 1; j < V; j++) if (logits[i * V + j] > logits[i * V + best]) best = j;
        expect(picks[i]).toBe(best);
      }
      // The float64 reference's own argmax at the last prompt position + 1 (one single-session check).
      const want = refLogits[lens[2]];
      const sorted = [...want].sort((x, y) => y - x);
      if (sorted[0] - sorted[1] > 1e-3) expect(picks[2]).toBe(want.indexOf(sorted[0]));
      // Both sessions moved on by one token: the next step agrees again.
      const next = await model.decodeArgmax(Int32Array.of(40, 50), Int32Array.of(picks[0], picks[0]), Int32Array.of(lens[0] + 1, lens[0] + 1));
      expect(next[0]).toBe(next[1]);
    });

    // The runner reads a long prompt in chunks (256 rows on the CPU); where only the last row's
    // logits are read, the last layer attends and runs its MLP for that row of the last chunk and
    // for no row of the others, while its k and v of every chunk must still reach the cache.
    it("a prompt of several chunks read for its last row only matches the reference, and so do the steps after it", async () => {
      const V = shape.vocab;
      const r2 = prng(seed + 200);
      const long = Array.from({ length: 600 }, () => Math.floor(r2() * V));
      const ref2 = new Reference(shape, weights);
      const want = [...long, ...cont].map((t) => ref2.step(t));
      const run = async (model: ReturnType<typeof loadModel>["model"], session: number) => {
        const last = await model.prefill(session, Int32Array.from(long), 0, false);
        expect(last.length).toBe(V);
        let worst = relErr(last, 0, want[long.length - 1]);
        for (let i = 0; i < cont.length; i++) {
          const l = await model.decode(Int32Array.of(session), Int32Array.of(cont[i]), Int32Array.of(long.length + i));
          worst = Math.max(worst, relErr(l, 0, want[long.length + i]));
        }
        return worst;
      };
      expect(await run(loadModel(dir).model, 60)).toBeLessThan(2e-5);
      const addon = loadAddon();
      const engine = new addon.Engine({ backend: "cpu", threads: 2 });
      const { model, spec } = loadModel(dir, { engine });
      const local = createLocalSession(engine, modelGeometry(spec.native), { pageSize: 8, sinkTokens: 8, windowTokens: 8, selectTokens: 8, tau: 0.9, summary: RETRIEVAL_NAMES.summary.max_min, combine: RETRIEVAL_NAMES.combine.softmax_mean, mode: RETRIEVAL_NAMES.mode.dense, recall: RETRIEVAL_NAMES.recall.gather, denseLayers: [] }, 640);
      try {
        expect(await run(model, local.session)).toBeLessThan(2e-5);
      } finally {
        await local.close();
      }
    });

    it.skipIf(typeof (loadAddon() as { Engine?: unknown }).Engine !== "function")("through the engine (dense mode) it matches the reference too", async () => {
      const addon = loadAddon();
      const engine = new addon.Engine({ backend: "cpu", threads: 2 });
      const { model, spec } = loadModel(dir, { engine });
      expect(model.attention).toBe("engine");
      const local = createLocalSession(engine, modelGeometry(spec.native), { pageSize: 8, sinkTokens: 8, windowTokens: 8, selectTokens: 8, tau: 0.9, summary: RETRIEVAL_NAMES.summary.max_min, combine: RETRIEVAL_NAMES.combine.softmax_mean, mode: RETRIEVAL_NAMES.mode.dense, recall: RETRIEVAL_NAMES.recall.gather, denseLayers: [] }, 64);
      try {
        const V = shape.vocab;
        const a = await model.prefill(local.session, Int32Array.from(prompt), 0, true);
        let worst = 0;
        for (let p = 0; p < prompt.length; p++) worst = Math.max(worst, relErr(a, p * V, refLogits[p]));
        for (let i = 0; i < cont.length; i++) {
          const l = await model.decode(Int32Array.of(local.session), Int32Array.of(cont[i]), Int32Array.of(prompt.length + i));
          worst = Math.max(worst, relErr(l, 0, refLogits[prompt.length + i]));
        }
        expect(worst).toBeLessThan(2e-5);
      } finally {
        await local.close();
      }
    });
  });
}
