/**
 * Accuracy tasks: one JSON object per line (JSONL), as the seeded task generator writes them.
 *
 *   {"id": "...", "family": "single_needle", "seed": 7, "context_tokens": 4096, "depth": 0.25,
 *    "prompt": "...", "answer": ["..."], "max_tokens": 16}
 *
 * `context_tokens` is the length the generator aimed at (the service reports the real prompt
 * length); `depth` (0..1) is where the first needle sits; `prompt` is the whole raw text, ending
 * where the model answers; `answer` lists the expected strings in order. An optional `"chat": true`
 * sends the prompt as one user message through the model's chat template instead of as raw text.
 */
import { readFileSync } from "node:fs";

export const FAMILIES = ["single_needle", "multi_key", "multi_value", "multi_query", "variable_tracking", "ordered_retrieval"] as const;
export type Family = (typeof FAMILIES)[number];

export interface Task {
  id: string;
  family: Family;
  seed: number;
  context_tokens: number;
  depth: number;
  prompt: string;
  answer: string[];
  max_tokens: number;
  chat?: boolean;
}

/** A malformed task file: the message names the line and the field. */
export class TaskError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "TaskError";
  }
}

/** Checks one parsed line against the schema; `where` prefixes the message ("tasks.jsonl:3"). */
export function validateTask(o: unknown, where: string): Task {
  const bad = (field: string, why: string): never => {
    throw new TaskError(`${where}: ${field} ${why}`);
  };
  if (typeof o !== "object" || o === null || Array.isArray(o)) bad("line", "is not a JSON object");
  const t = o as Record<string, unknown>;
  if (typeof t.id !== "string" || t.id === "") bad("id", "must be a non-empty string");
  if (!FAMILIES.includes(t.family as Family)) bad("family", `must be one of ${FAMILIES.join(", ")} (got ${JSON.stringify(t.family)})`);
  if (typeof t.seed !== "number" || !Number.isFinite(t.seed)) bad("seed", "must be a number");
  if (!Number.isSafeInteger(t.context_tokens) || (t.context_tokens as number) < 0) bad("context_tokens", "must be an integer >= 0");
  if (typeof t.depth !== "number" || !(t.depth >= 0 && t.depth <= 1)) bad("depth", "must be a number in [0, 1]");
  if (typeof t.prompt !== "string" || t.prompt === "") bad("prompt", "must be a non-empty string");
  if (!Array.isArray(t.answer) || t.answer.length === 0 || !t.answer.every((a) => typeof a === "string" && a !== "")) bad("answer", "must be a non-empty list of non-empty strings");
  if (!Number.isSafeInteger(t.max_tokens) || (t.max_tokens as number) < 1) bad("max_tokens", "must be an integer >= 1");
  if (t.chat !== undefined && typeof t.chat !== "boolean") bad("chat", "must be a boolean when given");
  return {
    id: t.id as string,
    family: t.family as Family,
    seed: t.seed as number,
    context_tokens: t.context_tokens as number,
    depth: t.depth as number,
    prompt: t.prompt as string,
    answer: [...(t.answer as string[])],
    max_tokens: t.max_tokens as number,
    ...(t.chat ? { chat: true } : {}),
  };
}

/** Parses JSONL text (blank lines skipped); ids must be unique. */
export function parseTasks(text: string, name = "tasks"): Task[] {
  const tasks: Task[] = [];
  const ids = new Set<string>();
  text.split("\n").forEach((line, i) => {
    if (line.trim() === "") return;
    const where = `${name}:${i + 1}`;
    let o: unknown;
    try {
      o = JSON.parse(line);
    } catch (e) {
      throw new TaskError(`${where}: not JSON (${(e as Error).message})`);
    }
    const t = validateTask(o, where);
    if (ids.has(t.id)) throw new TaskError(`${where}: id ${JSON.stringify(t.id)} appears twice`);
    ids.add(t.id);
    tasks.push(t);
  });
  return tasks;
}

export function readTasks(file: string): Task[] {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (e) {
    throw new TaskError(`cannot read ${file}: ${(e as Error).message}`);
  }
  const tasks = parseTasks(text, file);
  if (tasks.length === 0) throw new TaskError(`${file}: no tasks`);
  return tasks;
}
