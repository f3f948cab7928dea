/**
 * Open-loop serving load: both tiers as real processes, requests arriving as a Poisson process at
 * each rate whether or not earlier ones finished (as users do), mixed prompt lengths and output
 * lengths; per rate, what users and operators see.
 *
 *   npm run build:ts && npm run bench:serving [-- --rates 0.1,0.2,0.4 --duration-s 120 --drain-s 120
 *        --prompt-min 1024 --prompt-max 32768 --new-min 64 --new-max 512 --seed 1
 *        --capacity-bytes N --max-context T --root OTHER_CHECKOUT --label NAME --out FILE.json]
 *
 * - Arrivals: exponential gaps of mean 1/rate for --duration-s; each request is a stateless
 *   Generate of random token ids, its length log-uniform in [--prompt-min, --prompt-max], its
 *   max_tokens uniform in [--new-min, --new-max], sampled at temperature 1 (seeded per request, so
 *   the two builds see the same workload) with ignore_eos, so each runs to its max_tokens (a build
 *   without ignore_eos ignores the field; its outputs may then end early at an EOS).
 * - Per rate: completed, rejected (with the status) and failed requests; output tokens per second
 *   over the span from the first arrival to the last completion; TTFT (client: call to first
 *   chunk, so queue time included), TPOT (first to last chunk over the tokens after the first) and
 *   end-to-end p50/p99; queue time p50/p99 (the service's own, Usage.queue_ms, where the build
 *   reports it); peak host memory: both processes' resident anonymous and file memory plus the
 *   /dev/shm in use (the sessions' segments, counted once), sampled every 100 ms, and how much of
 *   it is above the idle baseline.
 * - Ceilings beside the figures: the offered load in prompt and output tokens per second, and
 *   the service's own prefill and decode rates measured alone at the start (one request of the
 *   median prompt length, then one of 256 new tokens), from which the rate at which it saturates.
 * - --root: run the services of another built checkout (its dist/services), e.g. an earlier build
 *   for a side-by-side table; the same seed gives the same arrivals and requests.
 *
 * The services run as configured by the environment (FREEKV_BACKEND, FREEKV_MODEL, …; the built-in
 * model on the CPU by default); --capacity-bytes sets FREEKV_KVSTORE_CAPACITY_BYTES and
 * --max-context FREEKV_MAX_CONTEXT_TOKENS (default: the longest prompt plus --new-max). Writes
 * JSON (machine, commit, date, environment, results) to --out, or
 * bench/results/serving-<date>.json.
 */
import { setMaxListeners } from "node:events";
import { mkdirSync, readFileSync, statfsSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { credentials, status } from "@grpc/grpc-js";
import { ComputeServiceClient, GenerateRequest, type GenerateResponse } from "../proto/gen/freekv/v1/compute.js";
import { defaultModelDir } from "../services/compute/model/loader.js";
import { mulberry32 } from "../tools/reference/prng.js";
import { freekvEnv, gitCommit, machineInfo, percentile, randomPromptIds, resultsPath } from "./common.js";
import { startTiers } from "../tools/dev/launch.js";

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, "..", here.includes(`${join("dist", "bench")}`) ? ".." : "");

const { values: args } = parseArgs({
  options: {
    rates: { type: "string", default: "0.1,0.2,0.4" },
    "duration-s": { type: "string", default: "120" },
    "prompt-min": { type: "string", default: "1024" },
    "prompt-max": { type: "string", default: "32768" },
    "new-min": { type: "string", default: "64" },
    "new-max": { type: "string", default: "512" },
    seed: { type: "string", default: "1" },
    "capacity-bytes": { type: "string" },
    "max-context": { type: "string" },
    "deadline-s": { type: "string", default: "900" },
    /** After a rate's arrivals end, requests still running this long after are cancelled and counted as unfinished (a time-limited run still reports). */
    "drain-s": { type: "string" },
    root: { type: "string" },
    label: { type: "string" },
    out: { type: "string" },
  },
});

const num = (k: keyof typeof args, min: number, integer = true): number => {
  const v = Number(args[k]);
  if (!Number.isFinite(v) || v < min || (integer && !Number.isInteger(v))) throw new RangeError(`--${k} must be ${integer ? "an integer" : "a number"} >= ${min}, got ${args[k]}`);
  return v;
};
const rates = args.rates!.split(",").filter(Boolean).map(Number);
if (!rates.length || rates.some((r) => !(r > 0))) throw new RangeError("--rates must hold positive numbers");
const durationS = num("duration-s", 1, false);
const promptMin = num("prompt-min", 1), promptMax = num("prompt-max", promptMin);
const newMin = num("new-min", 1), newMax = num("new-max", newMin);
const seed = num("seed", 0);
const deadlineS = num("deadline-s", 1, false);
const drainS = args["drain-s"] === undefined ? Infinity : num("drain-s", 0, false);
const otherRoot = args.root ? resolve(args.root) : undefined;
/** Whether the services' build reports Usage.queue_ms (an earlier build decodes it as 0). */
const reportsQueue = (() => {
  try {
    return readFileSync(join(otherRoot ?? root, "proto", "freekv", "v1", "compute.proto"), "utf8").includes("queue_ms");
  } catch {
    return otherRoot === undefined;
  }
})();

const modelDir = process.env.FREEKV_MODEL || defaultModelDir();
const vocab = (JSON.parse(readFileSync(join(modelDir, "config.json"), "utf8")) as { vocab_size: number }).vocab_size;
const maxContext = args["max-context"] ?? process.env.FREEKV_MAX_CONTEXT_TOKENS ?? String(promptMax + newMax + 64);

interface Req {
  id: number;
  at: number; // seconds after the start of the rate's window
  prompt: number;
  maxTokens: number;
  seed: number;
}

/** The workload of one rate: the same for any build given the seed. */
function workload(rate: number, rateIndex: number): Req[] {
  const r = mulberry32(seed * 1000 + rateIndex);
  const out: Req[] = [];
  for (let t = -Math.log(1 - r()) / rate, id = 0; t < durationS; t += -Math.log(1 - r()) / rate, id++) {
    const prompt = Math.round(Math.exp(Math.log(promptMin) + r() * (Math.log(promptMax) - Math.log(promptMin))));
    out.push({ id, at: t, prompt, maxTokens: newMin + Math.floor(r() * (newMax - newMin + 1)), seed: Math.floor(r() * 2 ** 31) });
  }
  return out;
}

const tokens = (n: number, seed: number) => randomPromptIds(n, seed, vocab);

interface Outcome {
  ok: boolean;
  code?: string;
  message?: string;
  ttftMs?: number;
  tpotMs?: number;
  e2eMs: number;
  queueMs?: number;
  prefillMs?: number;
  promptTokens: number;
  outputTokens: number;
  endedAt: number;
}

function call(client: ComputeServiceClient, q: Req, signal?: AbortSignal): Promise<Outcome> {
  return new Promise((done) => {
    if (signal?.aborted) return done({ ok: false, code: "CANCELLED", message: "not sent: the rate's drain time was over", e2eMs: 0, promptTokens: q.prompt, outputTokens: 0, endedAt: performance.now() });
    const t0 = performance.now();
    let first: number | undefined, last: number | undefined;
    let out = 0;
    let usage: { queueMs?: number; prefillMs?: number; promptTokens?: number } | undefined;
    const req = GenerateRequest.fromPartial({ prompt: { $case: "tokens", value: { ids: tokens(q.prompt, q.seed) } }, maxTokens: q.maxTokens, ignoreEos: true, sampling: { temperature: 1, seed: q.seed } });
    const stream = client.generate(req, { deadline: Date.now() + deadlineS * 1000 });
    // One drain signal serves every request of a rate: each call removes its listener when it ends.
    const onAbort = () => stream.cancel();
    signal?.addEventListener("abort", onAbort, { once: true });
    const finish = (o: Outcome) => {
      signal?.removeEventListener("abort", onAbort);
      done(o);
    };
    stream.on("data", (m: GenerateResponse) => {
      const now = performance.now();
      if (m.event?.$case === "chunk" && m.event.value.tokenIds.length) {
        first ??= now;
        last = now;
        out += m.event.value.tokenIds.length;
      } else if (m.event?.$case === "final") {
        const u = m.event.value.usage as ({ queueMs?: number } & Record<string, unknown>) | undefined;
        usage = { queueMs: typeof u?.queueMs === "number" ? u.queueMs : undefined, prefillMs: u?.prefillMs as number | undefined, promptTokens: u?.promptTokens as number | undefined };
      }
    });
    stream.on("error", (e: Error & { code?: number; details?: string }) => {
      const now = performance.now();
      finish({ ok: false, code: e.code === undefined ? "ERROR" : (status[e.code] ?? String(e.code)), message: (e.details ?? e.message).slice(0, 200), e2eMs: now - t0, promptTokens: q.prompt, outputTokens: out, endedAt: now });
    });
    stream.on("end", () => {
      const now = performance.now();
      finish({
        ok: first !== undefined && usage !== undefined,
        code: first === undefined ? "NO_OUTPUT" : undefined,
        ttftMs: first === undefined ? undefined : first - t0,
        tpotMs: first !== undefined && out > 1 ? (last! - first) / (out - 1) : undefined,
        e2eMs: now - t0,
        queueMs: reportsQueue ? usage?.queueMs : undefined,
        prefillMs: usage?.prefillMs,
        promptTokens: q.prompt,
        outputTokens: out,
        endedAt: now,
      });
    });
  });
}

function quantiles(xs: (number | undefined)[]) {
  const n = xs.filter((x) => x !== undefined && Number.isFinite(x)).length;
  return { n, p50: percentile(xs, 0.5), p99: percentile(xs, 0.99), max: percentile(xs, 1) };
}

/**
 * Resident memory of a process other than shared memory, bytes (0 once it is gone): RssAnon +
 * RssFile. Its shared-memory pages (the sessions' segments) are counted once, by /dev/shm.
 */
function rss(pid: number): number {
  try {
    const st = readFileSync(`/proc/${pid}/status`, "utf8");
    const kb = (k: string) => Number(new RegExp(`${k}:\\s+(\\d+) kB`).exec(st)?.[1] ?? 0);
    return (kb("RssAnon") + kb("RssFile")) * 1024;
  } catch {
    return 0;
  }
}
function shmUsed(): number {
  try {
    const s = statfsSync("/dev/shm");
    return (s.blocks - s.bfree) * s.bsize;
  } catch {
    return 0;
  }
}

const log = (s: string) => process.stderr.write(s + "\n");
const computeEnv: Record<string, string> = { FREEKV_LOG_LEVEL: "warn", FREEKV_MAX_CONTEXT_TOKENS: maxContext };
const kvstoreEnv: Record<string, string> = { FREEKV_LOG_LEVEL: "warn" };
if (args["capacity-bytes"]) kvstoreEnv.FREEKV_KVSTORE_CAPACITY_BYTES = args["capacity-bytes"];
const shmBefore = shmUsed();
const tiers = await startTiers({ kvstoreEnv, computeEnv, timeoutMs: 600_000, root: otherRoot });
const client = new ComputeServiceClient(tiers.compute.address, credentials.createInsecure(), { "grpc.max_receive_message_length": 64 << 20 });
const pids = [tiers.compute.pid, tiers.kvstore.pid];
const memNow = () => pids.reduce((a, p) => a + rss(p), 0) + Math.max(0, shmUsed() - shmBefore);
const results: Record<string, unknown>[] = [];
let alone: Record<string, number> = {};
const out = args.out ?? resultsPath(root, "serving");
/** Writes the results so far (after each rate, so a time-limited run keeps what it measured). */
function writeDoc(complete: boolean): void {
  const doc = {
    complete,
    what: "open-loop serving load through Generate (both tiers as processes): Poisson arrivals, mixed prompt and output lengths",
    label: args.label ?? null,
    date: new Date().toISOString(),
    commit: gitCommit(root),
    servicesCommit: gitCommit(otherRoot ?? root),
    machine: machineInfo(),
    env: { ...freekvEnv(), ...kvstoreEnv, ...computeEnv },
    model: modelDir,
    reportsQueueTime: reportsQueue,
    workload: { rates, durationS, drainS: Number.isFinite(drainS) ? drainS : null, promptMin, promptMax, newMin, newMax, seed, promptLengths: "log-uniform", newTokens: "uniform", sampling: "temperature 1, seeded per request" },
    alone,
    results,
  };
  mkdirSync(dirname(out), { recursive: true });
  writeFileSync(out, JSON.stringify(doc, null, 2));
}
try {
  // Alone: the service's prefill and decode rates, the ceiling of what it can serve.
  const median = Math.round(Math.sqrt(promptMin * promptMax));
  await call(client, { id: -1, at: 0, prompt: 64, maxTokens: 4, seed: 7 });
  const p = await call(client, { id: -2, at: 0, prompt: median, maxTokens: 1, seed: 8 });
  const d = await call(client, { id: -3, at: 0, prompt: 64, maxTokens: 256, seed: 9 });
  if (!p.ok || !d.ok) throw new Error(`the calibration requests failed: ${p.code ?? ""} ${p.message ?? ""} ${d.code ?? ""} ${d.message ?? ""}`);
  alone = { promptTokens: median, prefillTokensPerS: (median / p.ttftMs!) * 1000, decodeTokensPerS: 1000 / d.tpotMs!, ttftMs: p.ttftMs!, tpotMs: d.tpotMs! };
  log(`alone: prefill ${alone.prefillTokensPerS.toFixed(0)} tokens/s (${median}-token prompt), decode ${alone.decodeTokensPerS.toFixed(0)} tokens/s (${d.tpotMs!.toFixed(2)} ms/token, batch 1)`);
  await new Promise((r) => setTimeout(r, 500));
  const baseline = memNow();

  for (const [ri, rate] of rates.entries()) {
    const reqs = workload(rate, ri);
    if (reqs.length === 0) {
      log(`rate ${rate}/s: no arrival within ${durationS} s; skipped`);
      continue;
    }
    const offeredPrompt = reqs.reduce((a, q) => a + q.prompt, 0) / durationS;
    const offeredOut = reqs.reduce((a, q) => a + q.maxTokens, 0) / durationS;
    let peak = memNow();
    const sampler = setInterval(() => (peak = Math.max(peak, memNow())), 100);
    const start = performance.now();
    const drain = new AbortController();
    // Every request in flight listens to it (and removes its listener when it ends): many at once
    // is the point, not a leak.
    setMaxListeners(Infinity, drain.signal);
    const drainTimer = Number.isFinite(drainS) ? setTimeout(() => drain.abort(), (durationS + drainS) * 1000) : undefined;
    const outcomes = await Promise.all(
      reqs.map(
        (q) =>
          new Promise<Outcome>((r) => {
            setTimeout(() => void call(client, q, drain.signal).then(r), Math.max(0, start + q.at * 1000 - performance.now()));
          }),
      ),
    );
    clearTimeout(drainTimer);
    clearInterval(sampler);
    const end = Math.max(...outcomes.map((o) => o.endedAt));
    const ok = outcomes.filter((o) => o.ok);
    const failed = outcomes.filter((o) => !o.ok);
    const byCode: Record<string, number> = {};
    for (const o of failed) byCode[o.code!] = (byCode[o.code!] ?? 0) + 1;
    // Memory back to the idle baseline once the load is over?
    await new Promise((r) => setTimeout(r, 1000));
    const after = memNow();
    const row = {
      rate,
      requests: reqs.length,
      offered: { promptTokensPerS: offeredPrompt, outputTokensPerS: offeredOut, shareOfPrefillCeiling: offeredPrompt / alone.prefillTokensPerS },
      completed: ok.length,
      rejected: failed.filter((o) => o.code === "RESOURCE_EXHAUSTED").length,
      unfinished: drain.signal.aborted ? failed.filter((o) => o.code === "CANCELLED").length : 0,
      failedByStatus: byCode,
      rejectedShare: failed.filter((o) => o.code === "RESOURCE_EXHAUSTED").length / reqs.length,
      firstFailures: failed.slice(0, 3).map((o) => `${o.code}: ${o.message ?? ""}`),
      spanS: (end - start) / 1000,
      outputTokensPerS: (ok.reduce((a, o) => a + o.outputTokens, 0) / (end - start)) * 1000,
      promptTokensPerS: (ok.reduce((a, o) => a + o.promptTokens, 0) / (end - start)) * 1000,
      ttftMs: quantiles(ok.map((o) => o.ttftMs)),
      tpotMs: quantiles(ok.map((o) => o.tpotMs)),
      e2eMs: quantiles(ok.map((o) => o.e2eMs)),
      queueMs: quantiles(ok.map((o) => o.queueMs)),
      peakMemoryBytes: peak,
      peakAboveIdleBytes: peak - baseline,
      idleBytes: baseline,
      afterBytes: after,
    };
    results.push(row);
    writeDoc(false);
    const f = (x: number | null, d = 0) => (x === null ? "-" : x.toFixed(d));
    log(
      `rate ${rate}/s: ${ok.length}/${reqs.length} completed, ${row.rejected} rejected, ${failed.length - row.rejected - row.unfinished} failed` +
        (row.unfinished ? `, ${row.unfinished} unfinished after the ${drainS} s drain` : "") + "; " +
        `${row.outputTokensPerS.toFixed(1)} output tokens/s; TTFT p50 ${f(row.ttftMs.p50)} p99 ${f(row.ttftMs.p99)} ms; TPOT p50 ${f(row.tpotMs.p50, 1)} p99 ${f(row.tpotMs.p99, 1)} ms; ` +
        `queue p50 ${f(row.queueMs.p50)} p99 ${f(row.queueMs.p99)} ms; peak memory ${(peak / 2 ** 20).toFixed(0)} MiB (${((peak - baseline) / 2 ** 20).toFixed(0)} above idle)`,
    );
  }
} finally {
  client.close();
  await tiers.stop();
}

const f = (x: number | null | undefined, d = 0) => (x === null || x === undefined ? "-" : x.toFixed(d));
const table = [
  `prefill alone ${f(alone.prefillTokensPerS)} tokens/s, decode alone ${f(alone.decodeTokensPerS)} tokens/s (batch 1)`,
  "| rate/s | requests | offered prompt tok/s (of prefill ceiling) | completed | rejected | output tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | e2e p50 / p99 ms | queue p50 / p99 ms | peak memory MiB (above idle) |",
  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
  ...results.map((r) => {
    const x = r as unknown as {
      rate: number; requests: number; completed: number; rejected: number; outputTokensPerS: number; peakMemoryBytes: number; peakAboveIdleBytes: number;
      offered: { promptTokensPerS: number; shareOfPrefillCeiling: number };
      ttftMs: { p50: number | null; p99: number | null }; tpotMs: { p50: number | null; p99: number | null }; e2eMs: { p50: number | null; p99: number | null }; queueMs: { p50: number | null; p99: number | null };
    };
    return `| ${x.rate} | ${x.requests} | ${f(x.offered.promptTokensPerS)} (${(100 * x.offered.shareOfPrefillCeiling).toFixed(0)}%) | ${x.completed} | ${x.rejected} | ${f(x.outputTokensPerS, 1)} | ${f(x.ttftMs.p50)} / ${f(x.ttftMs.p99)} | ${f(x.tpotMs.p50, 1)} / ${f(x.tpotMs.p99, 1)} | ${f(x.e2eMs.p50)} / ${f(x.e2eMs.p99)} | ${f(x.queueMs.p50)} / ${f(x.queueMs.p99)} | ${f(x.peakMemoryBytes / 2 ** 20)} (${f(x.peakAboveIdleBytes / 2 ** 20)}) |`;
  }),
];
console.log(table.join("\n"));

writeDoc(true);
log(`wrote ${out}`);

