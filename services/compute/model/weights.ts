/**
 * Finds a checkpoint's weight tensors (model.safetensors, or the shards listed by
 * model.safetensors.index.json) and describes each one the native model needs as a TensorRef:
 * file, absolute offset, dtype, shape. Only the headers are read here; the native side maps the
 * files. Missing or mis-shaped tensors are reported by name before any native work.
 */
import { existsSync, readFileSync, statSync } from "node:fs";
import { join, resolve } from "node:path";
import type { ModelConfigNative, TensorRef } from "../../../native/binding.js";
import { readSafetensorsHeader, type TensorInfo } from "./safetensors.js";

export class ModelWeightsError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ModelWeightsError";
  }
}

/** The tensors the forward pass reads, with the shapes transformers stores them in. */
export function expectedTensors(c: ModelConfigNative): Map<string, number[]> {
  const H = c.hiddenSize, I = c.intermediateSize, V = c.vocabSize, Q = c.qHeads * c.headDim, K = c.kvHeads * c.headDim;
  const m = new Map<string, number[]>();
  m.set("model.embed_tokens.weight", [V, H]);
  if (!c.tieWordEmbeddings) m.set("lm_head.weight", [V, H]);
  m.set("model.norm.weight", [H]);
  for (let i = 0; i < c.layers; i++) {
    const p = `model.layers.${i}.`;
    m.set(p + "input_layernorm.weight", [H]);
    m.set(p + "post_attention_layernorm.weight", [H]);
    m.set(p + "self_attn.q_proj.weight", [Q, H]);
    m.set(p + "self_attn.k_proj.weight", [K, H]);
    m.set(p + "self_attn.v_proj.weight", [K, H]);
    m.set(p + "self_attn.o_proj.weight", [H, Q]);
    if (c.attentionBias) {
      m.set(p + "self_attn.q_proj.bias", [Q]);
      m.set(p + "self_attn.k_proj.bias", [K]);
      m.set(p + "self_attn.v_proj.bias", [K]);
    }
    m.set(p + "mlp.gate_proj.weight", [I, H]);
    m.set(p + "mlp.up_proj.weight", [I, H]);
    m.set(p + "mlp.down_proj.weight", [H, I]);
  }
  return m;
}

/** The safetensors files of a folder: the index's shards, or model.safetensors. */
export function weightFiles(dir: string): string[] {
  const index = join(dir, "model.safetensors.index.json");
  if (existsSync(index)) {
    let json: { weight_map?: Record<string, string> };
    try {
      json = JSON.parse(readFileSync(index, "utf8"));
    } catch (e) {
      throw new ModelWeightsError(`${index}: not JSON (${(e as Error).message})`);
    }
    if (!json.weight_map || typeof json.weight_map !== "object") throw new ModelWeightsError(`${index}: weight_map is missing`);
    const files = [...new Set(Object.values(json.weight_map))].sort();
    for (const f of files as unknown[]) {
      if (typeof f !== "string" || f === "" || f === "." || f === ".." || f.includes("/") || f.includes("\\"))
        throw new ModelWeightsError(`${index}: shard name ${JSON.stringify(f)} must be a plain file name`);
      if (!existsSync(join(dir, f)) || !statSync(join(dir, f)).isFile()) throw new ModelWeightsError(`${index} lists '${f}', which is not a file in ${dir}`);
    }
    return files.map((f) => resolve(dir, f));
  }
  const single = join(dir, "model.safetensors");
  if (existsSync(single)) return [resolve(single)];
  throw new ModelWeightsError(`${dir}: no model.safetensors or model.safetensors.index.json`);
}

/** TensorRefs for every tensor the model needs, validated against the config. */
export function collectTensorRefs(dir: string, config: ModelConfigNative): TensorRef[] {
  const all = new Map<string, TensorInfo & { file: string }>();
  for (const file of weightFiles(dir)) {
    const h = readSafetensorsHeader(file);
    for (const t of h.tensors.values()) all.set(t.name, { ...t, file });
  }
  const refs: TensorRef[] = [];
  for (const [name, shape] of expectedTensors(config)) {
    const t = all.get(name);
    if (!t) throw new ModelWeightsError(`${dir}: missing tensor '${name}'`);
    if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i]))
      throw new ModelWeightsError(`${dir}: tensor '${name}' has shape [${t.shape}], expected [${shape}]`);
    if (t.dtype !== "F32" && t.dtype !== "F16" && t.dtype !== "BF16")
      throw new ModelWeightsError(`${dir}: tensor '${name}' is ${t.dtype}; weights must be F32, F16 or BF16`);
    refs.push({ name, file: t.file, offset: t.offset, byteLength: t.byteLength, dtype: t.dtype, shape: t.shape });
  }
  return refs;
}
