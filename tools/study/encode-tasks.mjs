#!/usr/bin/env node
// Token ids of task prompts as the service makes them (the model folder's own tokenizer, through
// the same encodePrompt that `freekv eval` uses), one JSON line per task:
//   node tools/study/encode-tasks.mjs --model models/retrieval-8m --tasks FILE.jsonl [--count N] > ids.jsonl
// Also decodes: --decode reads {"id", "ids"} lines on stdin and writes {"id", "text"} lines.
// Needs `npm run build:ts` (reads dist/).
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { createInterface } from "node:readline";
import { loadTextCodec } from "../../dist/services/compute/model/tokenizer.js";
import { encodePrompt } from "../../dist/tools/eval/run.js";

const { values } = parseArgs({
  options: { model: { type: "string" }, tasks: { type: "string" }, count: { type: "string" }, decode: { type: "boolean" } },
});
if (!values.model) throw new Error("--model DIR is required");
const codec = loadTextCodec(values.model);
if (!codec) throw new Error(`no tokenizer in ${values.model}`);
if (values.decode) {
  for await (const line of createInterface({ input: process.stdin })) {
    if (!line.trim()) continue;
    const r = JSON.parse(line);
    process.stdout.write(JSON.stringify({ id: r.id, text: codec.decode(r.ids, true) }) + "\n");
  }
} else {
  if (!values.tasks) throw new Error("--tasks FILE is required");
  const lines = readFileSync(values.tasks, "utf8").split("\n").filter((l) => l.trim());
  const n = values.count ? Number(values.count) : lines.length;
  for (const line of lines.slice(0, n)) {
    const t = JSON.parse(line);
    const ids = encodePrompt(codec, t);
    process.stdout.write(JSON.stringify({ id: t.id, family: t.family, max_tokens: t.max_tokens, answer: t.answer, ids }) + "\n");
  }
}
