/**
 * Loads a Hugging Face model folder (config.json, safetensors weights, optional tokenizer) and
 * builds the native Model over it. The weights never pass through JavaScript: the native side maps
 * the files the TensorRefs point into.
 */
import { existsSync, readFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { loadAddon, type Engine, type Model, type TensorRef } from "../../../native/binding.js";
import { parseConfig } from "../../common/config.js";
import { computeConfigSchema } from "../config.js";
import { ModelConfigError, parseModelConfig, readJsonFile, type ModelSpec } from "./config.js";
import { loadTextCodec, type TextCodec } from "./tokenizer.js";
import { collectTensorRefs } from "./weights.js";

export interface ModelFolder {
  dir: string;
  spec: ModelSpec;
  tensors: TensorRef[];
  codec?: TextCodec;
}

export function readModelFolder(dir: string): ModelFolder {
  const abs = resolve(dir);
  const cfgFile = join(abs, "config.json");
  if (!existsSync(cfgFile)) throw new ModelConfigError(`${abs}: no config.json (not a Hugging Face model folder)`);
  const cfg = readJsonFile(cfgFile);
  if (!cfg || typeof cfg !== "object" || Array.isArray(cfg)) throw new ModelConfigError(`${cfgFile}: not a JSON object`);
  const genFile = join(abs, "generation_config.json");
  const gen = existsSync(genFile) ? readJsonFile(genFile) : undefined;
  if (gen !== undefined && (!gen || typeof gen !== "object" || Array.isArray(gen))) throw new ModelConfigError(`${genFile}: not a JSON object`);
  const spec = parseModelConfig(cfg as Record<string, unknown>, gen as Record<string, unknown> | undefined);
  const codec = loadTextCodec(abs);
  // Token ids the model cannot embed would fail every text request as if its client had sent them.
  const vocab = spec.native.vocabSize;
  if (codec && codec.maxTokenId >= vocab)
    throw new ModelConfigError(`${abs}: tokenizer.json has token id ${codec.maxTokenId}, outside config.json's vocab_size ${vocab}`);
  for (const [what, id] of [["bos_token_id", spec.bosTokenId], ...spec.eosTokenIds.map((e) => ["eos_token_id", e] as const)] as const)
    if (id !== undefined && !(Number.isInteger(id) && id >= 0 && id < vocab))
      throw new ModelConfigError(`${abs}: ${what} ${id} is outside config.json's vocab_size ${vocab}`);
  const tensors = collectTensorRefs(abs, spec.native);
  return { dir: abs, spec, tensors, codec };
}

export interface LoadedModel extends ModelFolder {
  model: Model;
}

/**
 * The folder's model on the native side. With an engine, attention runs through FreeKV sessions
 * of that engine; without one, the model keeps a dense KV cache per session (reference runs).
 */
export interface LoadModelOptions {
  engine?: Engine;
  threads?: number;
  /** Weight type of the GPU runner (used with a CUDA engine only). */
  deviceWeights?: "auto" | "bf16" | "f32";
}

export function loadModel(dir: string, options: LoadModelOptions = {}): LoadedModel {
  const folder = readModelFolder(dir);
  const { Model } = loadAddon();
  const model = new Model({ config: folder.spec.native, tensors: folder.tensors, engine: options.engine, threads: options.threads, deviceWeights: options.deviceWeights });
  return { ...folder, model };
}

/** loadModel with the weights mapped and converted off the event loop (large checkpoints). */
export async function loadModelAsync(dir: string, options: LoadModelOptions = {}): Promise<LoadedModel> {
  const folder = readModelFolder(dir);
  const { Model } = loadAddon();
  const model = await Model.load({ config: folder.spec.native, tensors: folder.tensors, engine: options.engine, threads: options.threads, deviceWeights: options.deviceWeights });
  return { ...folder, model };
}

/** A model folder under the repository's models/ (from services/compute/model or its compiled copy under dist/). */
function repoModelDir(name: string): string {
  const here = fileURLToPath(new URL(".", import.meta.url));
  // services/compute/model (tsx) or dist/services/compute/model (compiled)
  for (const up of ["../../..", "../../../.."]) {
    const d = resolve(here, up, "models", name);
    if (existsSync(join(d, "config.json"))) return d;
  }
  return resolve(here, "../../..", "models", name);
}

/** The built-in model's folder (made by scripts/make-builtin-model.mjs), from the repo root. */
export function builtinModelDir(): string {
  return repoModelDir("builtin");
}

/** The committed trained long-context model (tools/train/, models/retrieval-8m/RECIPE.md). */
export function trainedModelDir(): string {
  return repoModelDir("retrieval-8m");
}

/** FREEKV_MODEL (validated as the service reads it), or the built-in model. */
export function defaultModelDir(env: NodeJS.ProcessEnv = process.env): string {
  return parseConfig(computeConfigSchema.pick({ FREEKV_MODEL: true }), env).FREEKV_MODEL || builtinModelDir();
}
