/**
 * CPU benchmark of chunked prefill beside decoding, in process (generate() and the
 * ModelScheduler, the path of Generate without gRPC), on the built-in model:
 *  - alone: a `--prompt`-token prompt prefilled with nothing else running (tokens/s), and one
 *    session's greedy decode step with nothing else running (ms);
 *  - together, per chunk size of `--chunks`: session A decodes while session B's prompt is
 *    prefilled; B's prefill time and A's tokens during it (ms per token), beside the mean native
 *    time of B's chunks: a step of A waits for at most one chunk, so A's ms per token is about
 *    one chunk plus one step.
 *
 *   npm run build:ts && npm run bench:prefill-interleave [-- --prompt 8192 --chunks 32,128,512 --slices 0,1 --threads 2]
 *
 * Each chunk size runs with each time slice of --slices (FREEKV_PREFILL_SLICE: 0 = whole chunks;
 * s > 0 = while A decodes, B's chunks are cut to about s decode steps).
 *
 * Writes bench/results/prefill-interleave-<date>.json (machine, git commit, date, results).
 */
import { execSync } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import os from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { loadAddon } from "../native/binding.js";
import { generate, isProgress } from "../services/compute/generate/generation.js";
import { localRetrieval } from "../services/compute/generate/local.js";
import { ModelScheduler } from "../services/compute/generate/scheduler.js";
import { builtinModelDir, loadModel } from "../services/compute/model/loader.js";
import { createLocalSession, modelGeometry } from "../services/compute/model/localHost.js";
import { mulberry32 } from "../tools/reference/prng.js";

const here = dirname(fileURLToPath(import.meta.url));
const repo = here.split(/[\\/]/).includes("dist") ? join(here, "..", "..") : join(here, "..");

const { values: args } = parseArgs({
  options: {
    prompt: { type: "string", default: "8192" },
    chunks: { type: "string", default: "32,128,512" },
    /** Time slices (FREEKV_PREFILL_SLICE) to run each chunk size with; 0 = whole chunks. */
    slices: { type: "string", default: "0,1" },
    threads: { type: "string", default: "2" },
    out: { type: "string" },
  },
});
const promptTokens = Number(args.prompt);
const chunks = args.chunks!.split(",").map(Number);
const slices = args.slices!.split(",").map(Number);
const threads = Number(args.threads);

const engine = new (loadAddon().Engine)({ backend: "cpu", threads });
const loaded = loadModel(builtinModelDir(), { engine, threads });
const rand = mulberry32(7);
const randomTokens = (n: number) => Array.from({ length: n }, () => Math.floor(rand() * 500));
const maxContext = promptTokens + 4096;

/** One Generate on a fresh local session; `onToken` after each generated token. */
async function run(scheduler: ModelScheduler, prompt: number[], maxTokens: number, onToken?: () => boolean | void) {
  const local = createLocalSession(engine, modelGeometry(loaded.spec.native), localRetrieval({}), maxContext);
  const ac = new AbortController();
  try {
    const it = generate(loaded.model, scheduler, undefined, { session: local.session, contextTokens: 0, maxContextTokens: maxContext }, {
      prompt,
      maxTokens,
      sampling: { temperature: 0, topP: 0, topK: 0, seed: 0n },
      stopTokenIds: [],
      stopStrings: [],
      signal: ac.signal,
    });
    for (;;) {
      const r = await it.next();
      if (r.done) return r.value;
      if (!isProgress(r.value) && r.value.tokenIds.length && onToken?.()) ac.abort();
    }
  } finally {
    await local.close();
  }
}

interface Together {
  chunk_tokens: number;
  slice: number;
  b_prefill_s: number;
  b_tokens_per_s: number;
  b_chunk_mean_ms: number;
  a_tokens_during: number;
  a_ms_per_token_during: number;
}

async function main() {
  const plain = new ModelScheduler(loaded.model, { prefillSlice: 0 });
  await run(plain, randomTokens(256), 4); // warm-up
  const aloneB = await run(plain, randomTokens(promptTokens), 1);
  const aloneA = await run(plain, randomTokens(40), 64);
  const stepMs = aloneA.decodeMs / (aloneA.completionTokens - 1);
  const rows: Together[] = [];
  for (const chunk of chunks) for (const slice of slices) {
    const chunkMs: number[] = [];
    const sch = new ModelScheduler(loaded.model, { prefillChunkTokens: chunk, prefillSlice: slice, onPrefill: (_n, ms) => chunkMs.push(ms) });
    let aTokens = 0;
    let during = 0;
    let bRunning = false;
    let stop = false;
    const a = run(sch, randomTokens(40), 1 << 20, () => {
      aTokens++;
      if (bRunning) during++;
      return stop;
    });
    while (aTokens < 4) await new Promise((r) => setTimeout(r, 1));
    bRunning = true;
    chunkMs.length = 0;
    const t0 = performance.now();
    const b = await run(sch, randomTokens(promptTokens), 1, () => void (bRunning = false));
    const wall = performance.now() - t0;
    stop = true;
    await a;
    rows.push({
      chunk_tokens: chunk,
      slice,
      b_prefill_s: b.prefillMs / 1000,
      b_tokens_per_s: promptTokens / (b.prefillMs / 1000),
      b_chunk_mean_ms: chunkMs.reduce((x, y) => x + y, 0) / Math.max(1, chunkMs.length),
      a_tokens_during: during,
      a_ms_per_token_during: wall / Math.max(1, during),
    });
  }

  console.log(`alone: ${promptTokens}-token prefill ${(aloneB.prefillMs / 1000).toFixed(2)} s (${((promptTokens / aloneB.prefillMs) * 1000).toFixed(0)} tok/s); decode step ${stepMs.toFixed(2)} ms`);
  console.log(`${"chunk".padStart(6)} ${"slice".padStart(6)} ${"B prefill s".padStart(12)} ${"B tok/s".padStart(9)} ${"chunk ms".padStart(9)} ${"A tokens".padStart(9)} ${"A ms/token".padStart(11)}`);
  for (const r of rows)
    console.log(
      `${String(r.chunk_tokens).padStart(6)} ${String(r.slice).padStart(6)} ${r.b_prefill_s.toFixed(2).padStart(12)} ${r.b_tokens_per_s.toFixed(0).padStart(9)} ${r.b_chunk_mean_ms.toFixed(1).padStart(9)} ${String(r.a_tokens_during).padStart(9)} ${r.a_ms_per_token_during.toFixed(1).padStart(11)}`,
    );

  const git = (cmd: string) => {
    try {
      return execSync(`git ${cmd}`, { cwd: repo, encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] }).trim();
    } catch {
      return "unknown";
    }
  };
  const date = new Date();
  const stamp = date.toISOString().replace(/[-:]/g, "").replace("T", "-").slice(0, 13);
  const out = args.out ?? join(repo, "bench", "results", `prefill-interleave-${stamp}.json`);
  const dirty = git("status --porcelain --untracked-files=no") !== "";
  const result = {
    bench: "prefill-interleave",
    date: date.toISOString(),
    commit: git("rev-parse HEAD") + (dirty ? "+dirty" : ""),
    machine: { cpus: os.cpus().length, model: os.cpus()[0]?.model, memory_gb: Math.round(os.totalmem() / 2 ** 30), platform: `${os.platform()} ${os.release()}`, loadavg: os.loadavg() },
    node: process.version,
    threads,
    prompt_tokens: promptTokens,
    alone: { b_prefill_s: aloneB.prefillMs / 1000, b_tokens_per_s: (promptTokens / aloneB.prefillMs) * 1000, a_step_ms: stepMs },
    together: rows,
    note: "A decodes (greedy, batch 1) while B's prompt is prefilled in chunks through the one ModelScheduler: a step of A waits for at most one chunk of B, so A's ms per token during the prefill is about one chunk's native time plus one step; the chunk's time grows with the context it attends to",
  };
  mkdirSync(dirname(out), { recursive: true });
  writeFileSync(out, JSON.stringify(result, null, 2) + "\n");
  console.log(`wrote ${out}`);
  process.exit(0);
}

void main();
