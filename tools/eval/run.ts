/**
 * Runs tasks x modes through an EvalTarget and scores each generation: the loop of `freekv eval`,
 * with K requests in flight (the service batches their decode steps).
 */
import type { RetrievalConfig, RetrievalStats } from "../../proto/gen/freekv/v1/common.js";
import { RETRIEVAL_NAMES, type ModeName } from "../../services/common/retrieval.js";
import type { TextCodec } from "../../services/compute/model/tokenizer.js";
import { scoreAnswer } from "./score.js";
import type { EvalTarget } from "./target.js";
import type { Family, Task } from "./tasks.js";

/** The retrieval settings shared by every mode of a run; 0 / undefined = the service's default. */
export interface EvalSettings {
  pageSize?: number;
  sinkTokens?: number;
  selectTokens?: number;
  windowTokens?: number;
  tau?: number;
  denseLayers?: number[];
}

export interface TaskResult {
  id: string;
  family: Family;
  mode: ModeName;
  seed: number;
  depth: number;
  /** The generator's target length. */
  context_tokens: number;
  /** The prompt's real length in the model's tokens. */
  prompt_tokens: number;
  completion_tokens: number;
  finish_reason: string;
  answer: string[];
  text: string;
  correct: boolean;
  /** Per expected answer, found or not. */
  found: boolean[];
  fraction: number;
  prefill_ms: number;
  decode_ms: number;
  stats?: RetrievalStats;
  /** The request failed: scored as wrong, with the service's message. */
  error?: string;
}

/** The RetrievalConfig (wire form) of `mode` with `s`. */
export function retrievalFor(mode: ModeName, s: EvalSettings): Partial<RetrievalConfig> {
  return {
    mode: RETRIEVAL_NAMES.mode[mode],
    pageSize: s.pageSize ?? 0,
    sinkTokens: s.sinkTokens ?? 0,
    selectTokens: s.selectTokens ?? 0,
    windowTokens: s.windowTokens ?? 0,
    ...(s.tau !== undefined ? { tau: s.tau, tauSet: true } : {}),
    denseLayers: s.denseLayers ?? [],
  };
}

/** The token ids Generate would make of the task's prompt (raw text with BOS, or one chat turn). */
export function encodePrompt(codec: TextCodec, t: Task): number[] {
  // A local run, not a request: long-context tasks are not held to the service's text limit.
  return t.chat ? codec.encodeChat([{ role: "user", content: t.prompt }], false, Infinity) : codec.encode(t.prompt, true, { maxBytes: Infinity });
}

export interface RunOptions {
  target: EvalTarget;
  codec: TextCodec;
  tasks: Task[];
  modes: ModeName[];
  settings: EvalSettings;
  concurrency: number;
  onResult?: (r: TaskResult, done: number, total: number) => void;
}

/** Every (mode, task) pair; results in that order (mode-major) whatever order they finished in. */
export async function runEval(o: RunOptions): Promise<TaskResult[]> {
  const prompts = new Map<string, number[]>();
  const jobs: { mode: ModeName; task: Task }[] = [];
  for (const mode of o.modes) for (const task of o.tasks) jobs.push({ mode, task });
  const results: TaskResult[] = new Array(jobs.length);
  let next = 0;
  let done = 0;
  const worker = async () => {
    while (next < jobs.length) {
      const i = next++;
      const { mode, task } = jobs[i];
      let prompt = prompts.get(task.id);
      if (!prompt) prompts.set(task.id, (prompt = encodePrompt(o.codec, task)));
      results[i] = await runOne(o.target, task, mode, prompt, o.settings);
      o.onResult?.(results[i], ++done, jobs.length);
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(o.concurrency, jobs.length)) }, worker));
  return results;
}

async function runOne(target: EvalTarget, task: Task, mode: ModeName, prompt: number[], settings: EvalSettings): Promise<TaskResult> {
  const base = {
    id: task.id,
    family: task.family,
    mode,
    seed: task.seed,
    depth: task.depth,
    context_tokens: task.context_tokens,
    answer: task.answer,
  };
  try {
    const g = await target.generate(prompt, task.max_tokens, retrievalFor(mode, settings));
    const s = scoreAnswer(task.family, g.text, task.answer);
    return {
      ...base,
      prompt_tokens: g.promptTokens,
      completion_tokens: g.completionTokens,
      finish_reason: g.finishReason,
      text: g.text,
      correct: s.correct,
      found: s.found,
      fraction: s.fraction,
      prefill_ms: g.prefillMs,
      decode_ms: g.decodeMs,
      stats: g.stats,
    };
  } catch (e) {
    const err = e as { details?: string; message?: string };
    return {
      ...base,
      prompt_tokens: prompt.length,
      completion_tokens: 0,
      finish_reason: "error",
      text: "",
      correct: false,
      found: task.answer.map(() => false),
      fraction: 0,
      prefill_ms: 0,
      decode_ms: 0,
      error: err.details || err.message || String(e),
    };
  }
}
