import { readFileSync } from "node:fs";
/**
 * config.json of a Hugging Face checkpoint -> the runner's model configuration. Reads both the
 * transformers 4 spelling (`rope_theta` + `rope_scaling`, `torch_dtype`) and the transformers 5
 * one (`rope_parameters`, `dtype`). Everything the native forward pass cannot run is refused here
 * with a message naming the field.
 */
import type { ModelConfigNative } from "../../../native/binding.js";
import { ropeInvFreq, type RopeScaling } from "./rope.js";

export class ModelConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ModelConfigError";
  }
}

/** A JSON file of a model folder; ModelConfigError naming the file when it is not JSON. */
export function readJsonFile(file: string): unknown {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (e) {
    throw new ModelConfigError(`${file}: cannot read it (${(e as Error).message})`);
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new ModelConfigError(`${file}: not JSON (${(e as Error).message})`);
  }
}

const ARCHITECTURES: Record<string, "llama" | "mistral" | "qwen2"> = {
  LlamaForCausalLM: "llama",
  MistralForCausalLM: "mistral",
  Qwen2ForCausalLM: "qwen2",
};

export interface ModelSpec {
  /** What the native Model takes (with the rotary frequencies already scaled). */
  native: ModelConfigNative & { ropeInvFreq: Float32Array };
  /** The architectures entry of config.json, e.g. "LlamaForCausalLM". */
  architectureName: string;
  maxPositionEmbeddings: number;
  /** Weight dtype declared by the checkpoint (informational; tensors carry their own). */
  dtype?: string;
  bosTokenId?: number;
  eosTokenIds: number[];
  /** Settings of the checkpoint the runner does not apply, said once at load. */
  notes: string[];
}

type Json = Record<string, unknown>;

/**
 * Largest value each size of config.json may take: far above any model served today, and small
 * enough that nothing sized from it (tensor lists, name tables, RoPE tables) is allocated or looped
 * over before the tensors themselves are checked against the config.
 */
const CONFIG_LIMITS: Record<string, number> = {
  num_hidden_layers: 1024,
  num_attention_heads: 1024,
  num_key_value_heads: 1024,
  head_dim: 1024,
  hidden_size: 1 << 17,
  intermediate_size: 1 << 20,
  vocab_size: 1 << 22,
};

function int(cfg: Json, key: string, fallback?: number): number {
  const v = cfg[key] ?? fallback;
  const max = CONFIG_LIMITS[key] ?? 2 ** 31 - 1;
  if (typeof v !== "number" || !Number.isInteger(v) || v <= 0 || v > max)
    throw new ModelConfigError(`config.json: ${key} must be an integer in [1, ${max}], got ${JSON.stringify(cfg[key] ?? null).slice(0, 40)}`);
  return v;
}

function num(v: unknown, key: string): number {
  if (typeof v !== "number" || !Number.isFinite(v)) throw new ModelConfigError(`config.json: ${key} must be a number, got ${JSON.stringify(v)}`);
  return v;
}

function ids(v: unknown): number[] {
  if (typeof v === "number") return [v];
  if (Array.isArray(v)) return v.filter((x): x is number => typeof x === "number");
  return [];
}

/** rms_norm_eps in (0, 1), and a positive float32 (a value that rounds to 0 or to infinity is refused). */
function normEps(v: number): number {
  if (!(v > 0 && v < 1) || !(Math.fround(v) > 0)) throw new ModelConfigError(`config.json: rms_norm_eps must be in (0, 1) and representable in float32, got ${v}`);
  return v;
}

/** The rotary frequencies, each a positive finite float32: parameters that pass one by one can still give infinities or zeros. */
function checkedInvFreq(headDim: number, theta: number, scaling?: RopeScaling): Float32Array {
  let inv: Float32Array;
  try {
    inv = ropeInvFreq(headDim, theta, scaling);
  } catch (e) {
    throw new ModelConfigError(`config.json: ${(e as Error).message}`);
  }
  if (!(theta > 1)) throw new ModelConfigError(`config.json: rope_theta must be > 1, got ${theta}`);
  const bad = inv.findIndex((x) => !(Number.isFinite(x) && x > 0));
  if (bad >= 0)
    throw new ModelConfigError(
      `config.json: rope_theta ${theta}${scaling ? ` with ${scaling.type} scaling (factor ${scaling.factor})` : ""} gives rotary frequency ${bad} = ${inv[bad]}: the theta and the scaling factor must keep every frequency a positive float32`,
    );
  return inv;
}

/** Rope theta and scaling from either spelling. */
export function parseRope(cfg: Json): { theta: number; scaling?: RopeScaling } {
  const params = (cfg.rope_parameters ?? undefined) as Json | undefined;
  const legacy = (cfg.rope_scaling ?? undefined) as Json | undefined;
  const theta = num(params?.rope_theta ?? cfg.rope_theta ?? 10000, "rope_theta");
  const src = params ?? legacy;
  const type = (src?.rope_type ?? src?.type ?? "default") as string;
  if (type === "default") return { theta };
  if (type !== "llama3" && type !== "linear")
    throw new ModelConfigError(`config.json: rope type '${type}' is not supported (default, linear, llama3)`);
  const scaling: RopeScaling = { type, factor: num(src!.factor, "rope scaling factor") };
  if (type === "llama3") {
    scaling.lowFreqFactor = num(src!.low_freq_factor ?? 1, "low_freq_factor");
    scaling.highFreqFactor = num(src!.high_freq_factor ?? 4, "high_freq_factor");
    scaling.originalMaxPositionEmbeddings = num(
      src!.original_max_position_embeddings ?? cfg.original_max_position_embeddings ?? 8192,
      "original_max_position_embeddings",
    );
  }
  return { theta, scaling };
}

export function parseModelConfig(cfg: Json, generationConfig?: Json): ModelSpec {
  const archs = cfg.architectures;
  const name = Array.isArray(archs) && typeof archs[0] === "string" ? archs[0] : undefined;
  if (!name) throw new ModelConfigError("config.json: architectures is missing");
  const architecture = ARCHITECTURES[name];
  if (!architecture)
    throw new ModelConfigError(`config.json: unknown architecture '${name}' (supported: ${Object.keys(ARCHITECTURES).join(", ")})`);
  const hiddenSize = int(cfg, "hidden_size");
  const qHeads = int(cfg, "num_attention_heads");
  const kvHeads = int(cfg, "num_key_value_heads", qHeads);
  const headDim = cfg.head_dim == null ? hiddenSize / qHeads : int(cfg, "head_dim");
  if (!Number.isInteger(headDim)) throw new ModelConfigError("config.json: hidden_size is not a multiple of num_attention_heads and head_dim is absent");
  if (headDim % 2) throw new ModelConfigError(`config.json: the head dimension (head_dim, or hidden_size / num_attention_heads) must be even for rotary embeddings, got ${headDim}`);
  if (qHeads % kvHeads) throw new ModelConfigError(`config.json: num_attention_heads (${qHeads}) is not a multiple of num_key_value_heads (${kvHeads})`);
  if (cfg.mlp_bias === true) throw new ModelConfigError("config.json: mlp_bias is not supported");
  if (cfg.hidden_act != null && cfg.hidden_act !== "silu") throw new ModelConfigError(`config.json: hidden_act '${String(cfg.hidden_act)}' is not supported (silu)`);
  const { theta, scaling } = parseRope(cfg);
  const attentionBias = architecture === "qwen2" ? true : cfg.attention_bias === true;
  const eos = ids(generationConfig?.eos_token_id ?? cfg.eos_token_id);
  const bos = typeof cfg.bos_token_id === "number" ? cfg.bos_token_id : undefined;
  const notes: string[] = [];
  // Sliding-window attention (Mistral v0.1, Qwen2 with use_sliding_window) is not applied: the
  // runner attends over the whole context (through FreeKV's budget), which equals the reference
  // while the context is within the window.
  const window = cfg.sliding_window;
  const windowOn = architecture === "qwen2" ? cfg.use_sliding_window === true : typeof window === "number";
  if (windowOn && typeof window === "number" && window < (Number(cfg.max_position_embeddings) || Infinity))
    notes.push(`sliding_window ${window} is not applied (attention covers the whole context)`);
  return {
    native: {
      architecture,
      vocabSize: int(cfg, "vocab_size"),
      hiddenSize,
      intermediateSize: int(cfg, "intermediate_size"),
      layers: int(cfg, "num_hidden_layers"),
      qHeads,
      kvHeads,
      headDim,
      rmsNormEps: normEps(num(cfg.rms_norm_eps ?? 1e-6, "rms_norm_eps")),
      ropeTheta: theta,
      ropeScaling: scaling,
      ropeInvFreq: checkedInvFreq(headDim, theta, scaling),
      tieWordEmbeddings: cfg.tie_word_embeddings === true,
      attentionBias,
    },
    architectureName: name,
    maxPositionEmbeddings: typeof cfg.max_position_embeddings === "number" ? cfg.max_position_embeddings : 4096,
    dtype: (cfg.dtype ?? cfg.torch_dtype) as string | undefined,
    bosTokenId: bos,
    eosTokenIds: eos,
    notes,
  };
}
