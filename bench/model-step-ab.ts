/**
 * The native decode step Generate calls (Model.decodeArgmax: every layer, the engine's attention,
 * the head) on the CPU backend, for two builds of the addon side by side: each build in its own
 * process (FREEKV_ADDON), alternating A, B, A, B so that a drift of the machine shows as a
 * difference between rounds, not between builds. Sessions of the served model (the built-in one
 * unless --model) with a random prompt each, then --steps timed greedy steps of the whole batch.
 * What a change of the step's host-side checks costs shows here against the step itself.
 *
 *   npm run build:ts && npm run bench:model-step -- --addons NEW.node,OLD.node [--batch 16 --steps 300 --rounds 3]
 *
 * Writes JSON (machine, commit, date, per build and round the median and p90 ms per step) to
 * --out, or bench/results/model-step-ab-<date>.json.
 */
import { execFileSync } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { gitCommit, machineInfo, percentile, randomPromptIds, resultsPath } from "./common.js";

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, "..", here.includes(`${join("dist", "bench")}`) ? ".." : "");
const { values: args } = parseArgs({
  options: {
    addons: { type: "string", default: "" },
    model: { type: "string", default: join(root, "models", "builtin") },
    batch: { type: "string", default: "16" },
    prompt: { type: "string", default: "64" },
    steps: { type: "string", default: "300" },
    rounds: { type: "string", default: "3" },
    threads: { type: "string", default: "2" },
    /** Internal: run one measurement in this process and print its JSON. */
    child: { type: "boolean", default: false },
    out: { type: "string" },
  },
});
const batch = Number(args.batch);
const promptLen = Number(args.prompt);
const steps = Number(args.steps);
const rounds = Number(args.rounds);
const threads = Number(args.threads);
for (const [name, v, lo, hi] of [
  ["--batch", batch, 1, 256],
  ["--prompt", promptLen, 1, 4096],
  ["--steps", steps, 10, 100000],
  ["--rounds", rounds, 1, 100],
  ["--threads", threads, 1, 256],
] as const) {
  if (!Number.isInteger(v) || v < lo || v > hi) throw new RangeError(`${name} must be an integer in [${lo}, ${hi}], got ${v}`);
}

if (args.child) {
  // Loaded here so that FREEKV_ADDON (set by the parent) chooses the build.
  const { loadAddon } = await import("../native/binding.js");
  const { loadModel } = await import("../services/compute/model/loader.js");
  const { createLocalSession, modelGeometry } = await import("../services/compute/model/localHost.js");
  const { retrievalDefaults } = await import("../services/common/retrieval.js");
  const engine = new (loadAddon().Engine)({ backend: "cpu", threads });
  const { model, spec } = loadModel(args.model!, { engine, threads });
  const sessions = Array.from({ length: batch }, () => createLocalSession(engine, modelGeometry(spec.native), retrievalDefaults(), promptLen + steps + 8));
  for (let i = 0; i < batch; i++) await model.prefill(sessions[i].session, Int32Array.from(randomPromptIds(promptLen, 1000 + i, model.vocabSize)), 0, false);
  const ids = Int32Array.from(sessions, (s) => s.session);
  let tokens: Int32Array = Int32Array.from({ length: batch }, (_, i) => 16 + i);
  const ms: number[] = [];
  for (let k = 0; k < steps; k++) {
    const t0 = performance.now();
    tokens = await model.decodeArgmax(ids, tokens, new Int32Array(batch).fill(promptLen + k));
    ms.push(performance.now() - t0);
  }
  for (const s of sessions) await s.close();
  const warm = ms.slice(Math.min(10, ms.length >> 2));
  console.log(JSON.stringify({ median: percentile(warm, 0.5), p90: percentile(warm, 0.9), mean: warm.reduce((a, b) => a + b, 0) / warm.length }));
  process.exit(0);
}

const addons = args.addons!.split(",").filter(Boolean);
if (addons.length < 1) throw new Error("--addons: one or more paths of freekv.node, comma-separated");
const self = fileURLToPath(import.meta.url);
const results: Array<{ addon: string; round: number; median: number; p90: number; mean: number }> = [];
for (let r = 0; r < rounds; r++) {
  for (const addon of addons) {
    const out = execFileSync(process.execPath, [self, "--child", "--model", args.model!, "--batch", String(batch), "--prompt", String(promptLen), "--steps", String(steps), "--threads", String(threads)], {
      env: { ...process.env, FREEKV_ADDON: addon },
      encoding: "utf8",
    });
    const m = JSON.parse(out.trim().split("\n").at(-1)!) as { median: number; p90: number; mean: number };
    results.push({ addon, round: r + 1, ...m });
  }
}
const r3 = (x: number) => Math.round(x * 1000) / 1000;
console.log(`Model.decodeArgmax, CPU backend, batch ${batch}, ${steps} steps after a ${promptLen}-token prompt, ${threads} threads (ms per step)`);
console.log("| addon | round | median | p90 | mean |");
console.log("| --- | --- | --- | --- | --- |");
for (const x of results) console.log(`| ${x.addon} | ${x.round} | ${r3(x.median)} | ${r3(x.p90)} | ${r3(x.mean)} |`);
const file = args.out ?? resultsPath(root, "model-step-ab");
mkdirSync(dirname(file), { recursive: true });
writeFileSync(
  file,
  JSON.stringify({ what: "Model.decodeArgmax per step on the CPU backend, builds of the addon alternated (each in its own process)", date: new Date().toISOString(), commit: gitCommit(root), machine: machineInfo(), model: args.model, batch, prompt: promptLen, steps, threads, results }, null, 2),
);
console.log(`wrote ${file}`);
