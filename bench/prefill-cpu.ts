/**
 * CPU benchmark of prefill attention: prompt tokens per second of
 *  - `Model.prefill` of the built-in model (models/builtin) through the CPU engine, whole prompts
 *    of 2048 and 8192 tokens (all layers, attention exact and causal), and
 *  - `engine.prefillAttend` at a Llama-like layer shape (32 query / 8 KV heads of 128, f32 KV):
 *    one layer, a 4096-token prompt sent in 512-token chunks (each chunk attends to everything
 *    before it), so later chunks see long contexts.
 * Best of `--reps` runs (default 2) per case, after one small warm-up.
 *
 *   npm run build:ts && npm run bench:prefill-cpu [-- --reps 3 --threads 2 --model-prompts 2048,8192]
 *
 * Writes bench/results/prefill-cpu-<date>.json (machine, git commit, date, node version, results).
 */
import { execSync } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import os from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { loadAddon, type Engine, type Geometry, type Retrieval } from "../native/binding.js";
import { RETRIEVAL_NAMES } from "../services/common/retrieval.js";
import { builtinModelDir, loadModel } from "../services/compute/model/loader.js";
import { createLocalSession, modelGeometry } from "../services/compute/model/localHost.js";

const here = dirname(fileURLToPath(import.meta.url));
const repo = here.split(/[\\/]/).includes("dist") ? join(here, "..", "..") : join(here, "..");

const { values: args } = parseArgs({
  options: {
    reps: { type: "string", default: "2" },
    threads: { type: "string" },
    "model-prompts": { type: "string", default: "2048,8192" },
    "engine-prompt": { type: "string", default: "4096" },
    "engine-chunk": { type: "string", default: "512" },
    out: { type: "string" },
  },
});
const reps = Number(args.reps);
const threads = args.threads === undefined ? undefined : Number(args.threads);
const modelPrompts = args["model-prompts"]!.split(",").map(Number);
const enginePrompt = Number(args["engine-prompt"]);
const engineChunk = Number(args["engine-chunk"]);

const addon = loadAddon();

function retrieval(): Retrieval {
  return { pageSize: 16, sinkTokens: 32, windowTokens: 32, selectTokens: 64, tau: 0.9, summary: RETRIEVAL_NAMES.summary.max_min, combine: RETRIEVAL_NAMES.combine.softmax_mean, mode: RETRIEVAL_NAMES.mode.dense, recall: RETRIEVAL_NAMES.recall.gather, denseLayers: [] };
}

function newEngine(): Engine {
  return new addon.Engine({ backend: "cpu", ...(threads === undefined ? {} : { threads }) });
}

/** Deterministic pseudo-random normals-ish values in [-1, 1). */
function fill(n: number, seed: number): Float32Array {
  const a = new Float32Array(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    a[i] = ((x >>> 0) / 2 ** 32) * 2 - 1;
  }
  return a;
}

interface Row {
  case: string;
  tokens: number;
  best_s: number;
  tokens_per_s: number;
  runs_s: number[];
}

async function modelCase(prompt: number): Promise<Row> {
  const runs: number[] = [];
  for (let r = 0; r < reps; r++) {
    const engine = newEngine();
    const { model, spec } = loadModel(builtinModelDir(), { engine });
    const local = createLocalSession(engine, modelGeometry(spec.native), retrieval(), prompt + 16);
    try {
      const tokens = new Int32Array(prompt);
      for (let i = 0; i < prompt; i++) tokens[i] = (i * 7919 + 13) % Math.min(500, model.vocabSize);
      const t0 = performance.now();
      await model.prefill(local.session, tokens, 0, false);
      runs.push((performance.now() - t0) / 1000);
    } finally {
      await local.close();
    }
  }
  const best = Math.min(...runs);
  return { case: `builtin Model.prefill`, tokens: prompt, best_s: best, tokens_per_s: prompt / best, runs_s: runs };
}

async function engineCase(prompt: number, chunk: number): Promise<Row> {
  const Hq = 32,
    Hkv = 8,
    D = 128;
  const geometry: Geometry = { layers: 1, qHeads: Hq, kvHeads: Hkv, headDim: D, kvDtype: 1 as Geometry["kvDtype"] };
  const q = fill(chunk * Hq * D, 1),
    k = fill(chunk * Hkv * D, 2),
    v = fill(chunk * Hkv * D, 3);
  const runs: number[] = [];
  for (let r = 0; r < reps; r++) {
    const engine = newEngine();
    const local = createLocalSession(engine, geometry, retrieval(), prompt + 16);
    try {
      const t0 = performance.now();
      for (let done = 0; done < prompt; done += chunk) await engine.prefillAttend(local.session, 0, q, k, v, chunk);
      runs.push((performance.now() - t0) / 1000);
    } finally {
      await local.close();
    }
  }
  const best = Math.min(...runs);
  return { case: `engine.prefillAttend 32q/8kv D128 f32, chunks of ${chunk}`, tokens: prompt, best_s: best, tokens_per_s: prompt / best, runs_s: runs };
}

function git(cmd: string): string {
  try {
    return execSync(`git ${cmd}`, { cwd: repo, encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] }).trim();
  } catch {
    return "unknown";
  }
}

async function main() {
  await modelCase(256); // warm-up (page-in of the weights, thread pools)
  const rows: Row[] = [];
  for (const p of modelPrompts) rows.push(await modelCase(p));
  rows.push(await engineCase(enginePrompt, engineChunk));

  console.log(`${"case".padEnd(56)} ${"tokens".padStart(7)} ${"best s".padStart(9)} ${"tok/s".padStart(10)}`);
  for (const r of rows) console.log(`${r.case.padEnd(56)} ${String(r.tokens).padStart(7)} ${r.best_s.toFixed(3).padStart(9)} ${r.tokens_per_s.toFixed(1).padStart(10)}`);

  const date = new Date();
  const stamp = date.toISOString().replace(/[-:]/g, "").replace("T", "-").slice(0, 13);
  const out = args.out ?? join(repo, "bench", "results", `prefill-cpu-${stamp}.json`);
  const dirty = git("status --porcelain --untracked-files=no") !== "";
  const result = {
    bench: "prefill-cpu",
    date: date.toISOString(),
    commit: git("rev-parse HEAD") + (dirty ? "+dirty" : ""),
    machine: { cpus: os.cpus().length, model: os.cpus()[0]?.model, memory_gb: Math.round(os.totalmem() / 2 ** 30), platform: `${os.platform()} ${os.release()}`, loadavg: os.loadavg() },
    node: process.version,
    config: { reps, threads: threads ?? "default", modelPrompts, enginePrompt, engineChunk },
    results: rows,
  };
  mkdirSync(dirname(out), { recursive: true });
  writeFileSync(out, JSON.stringify(result, null, 2) + "\n");
  console.log(`wrote ${out}`);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
