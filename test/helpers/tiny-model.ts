/**
 * The tiny Llama fixture and a small engine budget for tests that run the Model through the
 * binding over engine sessions (pages of 8 tokens: a few dozen tokens cross pages and the budget).
 */
import { copyFileSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { RETRIEVAL_NAMES } from "../../services/common/retrieval.js";

export const TINY_LLAMA = join(import.meta.dirname, "..", "fixtures", "models", "tiny-llama3");

export const SMALL_RETRIEVAL = {
  pageSize: 8,
  sinkTokens: 8,
  windowTokens: 8,
  selectTokens: 16,
  tau: 0.9,
  summary: RETRIEVAL_NAMES.summary.max_min,
  combine: RETRIEVAL_NAMES.combine.softmax_mean,
  mode: RETRIEVAL_NAMES.mode.freekv,
  recall: RETRIEVAL_NAMES.recall.gather,
  denseLayers: [],
};

/**
 * The tiny Qwen2 fixture's weights in a temporary folder, with no EOS (a generation runs to
 * max_tokens) and room for long answers: for tests that need a long generation. The caller removes it.
 */
export function tinyModelWithoutEos(prefix: string): string {
  const from = join(import.meta.dirname, "..", "fixtures", "models", "tiny-qwen2");
  const dir = mkdtempSync(join(tmpdir(), prefix));
  const cfg = JSON.parse(readFileSync(join(from, "config.json"), "utf8"));
  writeFileSync(join(dir, "config.json"), JSON.stringify({ ...cfg, eos_token_id: [], max_position_embeddings: 32768 }));
  copyFileSync(join(from, "model.safetensors"), join(dir, "model.safetensors"));
  return dir;
}
