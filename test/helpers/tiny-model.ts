/**
 * The tiny Llama fixture and a small engine budget for tests that run the Model through the
 * binding over engine sessions (pages of 8 tokens: a few dozen tokens cross pages and the budget).
 */
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
