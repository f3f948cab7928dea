/**
 * Time to first token through Generate, both tiers as real processes (tools/dev/launch.ts), and
 * the pace of a session that is decoding while a long prompt is prefilled.
 *
 *   npm run build:ts && npm run bench:ttft [-- --prompts 8192,32768 --runs 2 --max-tokens 4
 *                                          --background 32768 --background-tokens 600
 *                                          --gap-ms 0 --hf anchor.json --out FILE.json]
 *
 * The services run as configured by the environment (FREEKV_BACKEND, FREEKV_MODEL, …; the built-in
 * model on the CPU by default); FREEKV_MAX_CONTEXT_TOKENS defaults to the longest prompt plus
 * room for the generated tokens. Prompts are random token ids (seeded) sent as TokenIds, greedy.
 *
 * Figures:
 * - first request after start: a 64-token prompt right after both services report ready. With
 *   the model loaded at start it pays no load.
 * - per prompt length: client time from the call to the first chunk (TTFT), the service's own
 *   prefill_ms (Usage), prompt tokens/s. Beside them, transformers' prefill of the same length
 *   on the same machine when --hf names bench/anchor/hf_anchor.py's JSON (its "prefill" list).
 * - --background L: session A decodes (short prompts, up to --background-tokens tokens a call,
 *   call after call); its time per output token is taken alone, then while session B's L-token
 *   prompt is prefilled (from B's call to B's first chunk). Reported as distributions (median,
 *   p90, p99, max) and the ratio of medians. B's call has --background-deadline-s (default 120 s):
 *   a prompt still prefilling then is cancelled and A's pace up to that moment is reported, with
 *   how far B got (its PrefillProgress events).
 *
 * - with --log-level debug: each session's creation (kvstore and open times) beside the close of the
 *   session before it (engine, unmapping, kvstore release) and how much of that close still ran
 *   after the creation began; --gap-ms N pauses before each timed prompt, so that the close has
 *   ended (whether a prompt pays for its predecessor's teardown).
 *
 * Writes JSON (machine, commit, date, environment, results) to --out, or
 * bench/results/ttft-<date>.json, and the services' log (--log-level) beside it.
 */
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { credentials } from "@grpc/grpc-js";
import { ComputeServiceClient, GenerateRequest, type GenerateResponse } from "../proto/gen/freekv/v1/compute.js";
import { defaultModelDir } from "../services/compute/model/loader.js";
import { freekvEnv, gitCommit, machineInfo, percentile, randomPromptIds, resultsPath } from "./common.js";
import { startTiers } from "../tools/dev/launch.js";

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, "..", here.includes(`${join("dist", "bench")}`) ? ".." : "");

const { values: args } = parseArgs({
  options: {
    prompts: { type: "string", default: "2048,8192" },
    runs: { type: "string", default: "2" },
    "max-tokens": { type: "string", default: "4" },
    background: { type: "string", default: "" },
    "background-tokens": { type: "string", default: "4000" },
    hf: { type: "string" },
    out: { type: "string" },
    "timeout-s": { type: "string", default: "600" },
    /** The long prompt's Generate deadline in the --background run: past it the prompt is cancelled and the pace measured so far reported. */
    "background-deadline-s": { type: "string", default: "120" },
    /** A pause before each timed prompt (ms): whether a prompt that follows another pays for its predecessor's teardown (the previous session's close runs after its stream ends). */
    "gap-ms": { type: "string", default: "0" },
    /** The services' log level; their output is written beside --out as <out>.services.log. */
    "log-level": { type: "string", default: "warn" },
  },
});

const prompts = args.prompts!.split(",").filter(Boolean).map(Number);
const runs = Number(args.runs);
const maxTokens = Number(args["max-tokens"]);
const background = args.background ? Number(args.background) : 0;
const bgTokens = Number(args["background-tokens"]);
const gapMs = Number(args["gap-ms"]);
if (!Number.isInteger(gapMs) || gapMs < 0) throw new RangeError(`--gap-ms must be an integer >= 0 (got ${args["gap-ms"]})`);
for (const [k, v] of Object.entries({ prompts: Math.min(...prompts), runs, "max-tokens": maxTokens, "background-tokens": bgTokens }))
  if (!Number.isInteger(v) || v < 1) throw new RangeError(`--${k} must hold positive integers`);
if (background && (!Number.isInteger(background) || background < 1)) throw new RangeError("--background must be a positive integer");
if (!(Number(args["background-deadline-s"]) > 0)) throw new RangeError(`--background-deadline-s must be a positive number (got ${args["background-deadline-s"]})`);

const modelDir = process.env.FREEKV_MODEL || defaultModelDir();
const modelConfig = JSON.parse(readFileSync(join(modelDir, "config.json"), "utf8")) as { vocab_size: number };
const vocab = modelConfig.vocab_size;
const longest = Math.max(...prompts, background);
const maxContext = process.env.FREEKV_MAX_CONTEXT_TOKENS ?? String(longest + Math.max(maxTokens, bgTokens) + 256);

function randomTokens(n: number, seed: number): GenerateRequest["prompt"] {
  return { $case: "tokens", value: { ids: randomPromptIds(n, seed, vocab) } };
}

interface Call {
  ttftMs: number;
  totalMs: number;
  prefillMs: number;
  /** Usage.queue_ms: admission, which includes reserving the session's memory at the kvstore and mapping it. */
  queueMs: number;
  promptTokens: number;
  /** Client arrival time (ms, performance.now) and token count of every chunk. */
  chunks: { at: number; tokens: number }[];
  startedAt: number;
}

/** `onTokens`: after each chunk, the tokens streamed so far (a chunk may carry several). */
function generate(client: ComputeServiceClient, prompt: GenerateRequest["prompt"], max: number, deadlineS: number, onTokens?: (count: number) => void, progress?: (tokens: number) => void): Promise<Call> {
  return new Promise((resolve, reject) => {
    const startedAt = performance.now();
    const chunks: Call["chunks"] = [];
    let streamed = 0;
    let usage: { prefillMs: number; queueMs: number; promptTokens: number } | null = null;
    const req = GenerateRequest.fromPartial({ prompt, maxTokens: max, ignoreEos: true, sampling: { temperature: 0 }, ...(progress ? { prefillProgressMinTokens: 1 } : {}) });
    const stream = client.generate(req, { deadline: Date.now() + deadlineS * 1000 });
    stream.on("data", (m: GenerateResponse) => {
      const at = performance.now();
      if (m.event?.$case === "chunk") {
        chunks.push({ at, tokens: m.event.value.tokenIds.length });
        streamed += m.event.value.tokenIds.length;
        onTokens?.(streamed);
      }
      else if (m.event?.$case === "progress") progress?.(m.event.value.prefilledTokens);
      else if (m.event?.$case === "final") usage = { prefillMs: m.event.value.usage?.prefillMs ?? NaN, queueMs: m.event.value.usage?.queueMs ?? NaN, promptTokens: m.event.value.usage?.promptTokens ?? 0 };
    });
    stream.on("error", reject);
    stream.on("end", () => {
      if (!usage || chunks.length === 0) return reject(new Error("the stream ended without a chunk and a final message"));
      const u = usage as { prefillMs: number; queueMs: number; promptTokens: number };
      resolve({ ttftMs: chunks[0].at - startedAt, totalMs: performance.now() - startedAt, prefillMs: u.prefillMs, queueMs: u.queueMs, promptTokens: u.promptTokens, chunks, startedAt });
    });
  });
}

/**
 * From compute's log (debug level): each session's creation (kvstoreMs, openMs) beside the close
 * of the session created before it (closeMs: engineCloseMs, unmapMs, releaseMs), with how much of
 * that close ran while the new session was being created: whether a prompt pays for its
 * predecessor's teardown. Times are the log lines' (written at the end of each operation).
 */
function sessionTimeline(lines: string[]) {
  type Line = { msg?: string; time?: number; session?: string; [k: string]: unknown };
  const parsed: Line[] = [];
  for (const l of lines) {
    try {
      const o = JSON.parse(l) as Omit<Line, "time"> & { time?: unknown };
      // The services log ISO times (services/common/log.ts); a number is taken as epoch ms.
      const time = typeof o.time === "number" ? o.time : typeof o.time === "string" ? Date.parse(o.time) : NaN;
      if (typeof o.msg === "string" && Number.isFinite(time)) parsed.push({ ...o, time });
    } catch {
      // not a log line
    }
  }
  const closed = new Map(parsed.filter((l) => l.msg === "session closed").map((l) => [String(l.session), l]));
  const created = parsed.filter((l) => l.msg === "session created" && typeof l.openMs === "number");
  const num = (x: unknown) => (typeof x === "number" ? x : null);
  return created.map((c, i) => {
    const createStart = c.time! - (num(c.kvstoreMs) ?? 0) - (num(c.openMs) ?? 0);
    const prev = i > 0 ? closed.get(String(created[i - 1].session)) : undefined;
    const prevClose = prev
      ? {
          closeMs: num(prev.closeMs), engineCloseMs: num(prev.engineCloseMs), unmapMs: num(prev.unmapMs), releaseMs: num(prev.releaseMs),
          // How long the previous close ran after this session's creation began (0: it had ended).
          overlapMs: Math.max(0, prev.time! - createStart),
        }
      : null;
    return { session: c.session, kvstoreMs: num(c.kvstoreMs), openMs: num(c.openMs), reservedTokens: num(c.reservedTokens), previousClose: prevClose };
  });
}

function quantiles(xs: number[]) {
  const q = (p: number) => percentile(xs, p) ?? NaN;
  return { n: xs.length, mean: xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : NaN, median: q(0.5), p90: q(0.9), p99: q(0.99), max: q(1) };
}

/** Milliseconds per output token of each chunk after the first, with its arrival time. */
function perToken(c: Call): { at: number; ms: number }[] {
  const out: { at: number; ms: number }[] = [];
  for (let i = 1; i < c.chunks.length; i++) out.push({ at: c.chunks[i].at, ms: (c.chunks[i].at - c.chunks[i - 1].at) / Math.max(1, c.chunks[i].tokens) });
  return out;
}

const hf = args.hf && existsSync(args.hf) ? (JSON.parse(readFileSync(args.hf, "utf8")) as { prefill?: { tokens: number; ms?: number }[]; transformers?: string; gpu?: string }) : null;
const hfMs = (t: number) => hf?.prefill?.find((p) => p.tokens === t)?.ms ?? null;

const log = (s: string) => process.stderr.write(s + "\n");
const t0 = performance.now();
const tiers = await startTiers({
  kvstoreEnv: { FREEKV_LOG_LEVEL: args["log-level"] },
  computeEnv: { FREEKV_LOG_LEVEL: args["log-level"], FREEKV_MAX_CONTEXT_TOKENS: maxContext },
  timeoutMs: Number(args["timeout-s"]) * 1000,
});
const readyMs = performance.now() - t0;
const client = new ComputeServiceClient(tiers.compute.address, credentials.createInsecure(), { "grpc.max_receive_message_length": 64 << 20 });
const deadlineS = Number(args["timeout-s"]);
const results: Record<string, unknown> = {};
const commit = gitCommit(root);
const out = args.out ?? resultsPath(root, "ttft");
let completed = false;
/** Writes what was measured so far (after each phase: a run cut off by a time limit keeps it). */
function writeResults(complete: boolean): void {
  const doc = {
    what: "time to first token through Generate (both tiers as processes) and a decoding session's pace while a long prompt prefills",
    date: new Date().toISOString(),
    commit,
    complete,
    machine: machineInfo(),
    env: freekvEnv(),
    model: modelDir,
    maxContextTokens: Number(maxContext),
    gapMs,
    servicesReadyMs: readyMs,
    transformers: hf ? { version: hf.transformers, gpu: hf.gpu, prefill: hf.prefill } : null,
    results,
  };
  mkdirSync(dirname(out), { recursive: true });
  writeFileSync(out, JSON.stringify(doc, null, 2));
}
try {
  log(`services ready in ${(readyMs / 1000).toFixed(1)} s (backend ${process.env.FREEKV_BACKEND ?? "cpu"}, model ${modelDir}, max context ${maxContext})`);
  const first = await generate(client, randomTokens(64, 1), 2, deadlineS);
  results.firstRequest = { promptTokens: first.promptTokens, ttftMs: first.ttftMs, prefillMs: first.prefillMs };
  log(`first request after start (64-token prompt): TTFT ${first.ttftMs.toFixed(0)} ms (prefill ${first.prefillMs.toFixed(0)} ms)`);

  const rows: Record<string, unknown>[] = [];
  const table = ["| prompt tokens | TTFT ms (median) | queue_ms | prefill_ms | prompt tokens/s | transformers prefill ms |", "| ---: | ---: | ---: | ---: | ---: | ---: |"];
  for (const n of prompts) {
    const calls: Call[] = [];
    for (let r = 0; r < runs; r++) {
      if (gapMs) await new Promise((resolve) => setTimeout(resolve, gapMs));
      calls.push(await generate(client, randomTokens(n, 100 + r), maxTokens, deadlineS));
    }
    const ttft = quantiles(calls.map((c) => c.ttftMs));
    const prefill = quantiles(calls.map((c) => c.prefillMs));
    const queue = quantiles(calls.map((c) => c.queueMs));
    const row = { promptTokens: n, runs, ttftMs: calls.map((c) => c.ttftMs), queueMs: calls.map((c) => c.queueMs), prefillMs: calls.map((c) => c.prefillMs), ttftMedianMs: ttft.median, tokensPerS: (n / ttft.median) * 1000, transformersPrefillMs: hfMs(n) };
    rows.push(row);
    const h = hfMs(n);
    table.push(`| ${n} | ${ttft.median.toFixed(0)} | ${queue.median.toFixed(0)} | ${prefill.median.toFixed(0)} | ${row.tokensPerS.toFixed(0)} | ${h == null ? "" : h.toFixed(0)} |`);
    log(table[table.length - 1]);
  }
  results.prompts = rows;
  writeResults(false);

  if (background) {
    // Session A decodes (call after call: a generation may end early on a stop token) from before
    // B's long prompt is sent until after B's first token; its time per token is taken between
    // chunks of one call (never across two calls).
    const waitFor = Math.min(64, Math.max(8, Math.floor(bgTokens / 10)));
    let bDone = false;
    const aCalls: Call[] = [];
    let releaseB!: () => void;
    const aWarm = new Promise<void>((resolve) => (releaseB = resolve));
    let seenTokens = 0;
    const aLoop = (async () => {
      for (let k = 0; !bDone; k++) {
        const before = seenTokens;
        aCalls.push(await generate(client, randomTokens(32, 7 + k), bgTokens, deadlineS, (n) => (seenTokens = before + n) >= waitFor && releaseB()));
      }
    })();
    await aWarm;
    const bStart = performance.now();
    const bDeadlineS = Number(args["background-deadline-s"]);
    let bPrefilled = 0;
    let b: Call | null = null;
    try {
      b = await generate(client, randomTokens(background, 9), 2, bDeadlineS, undefined, (t) => (bPrefilled = t));
    } catch (e) {
      log(`the ${background}-token prompt did not reach its first token within ${bDeadlineS} s (${bPrefilled} tokens prefilled): ${(e as Error).message}`);
    }
    bDone = true;
    const bFirst = b ? b.chunks[0].at : performance.now();
    await aLoop;
    const steps = aCalls.flatMap(perToken);
    const alone = steps.filter((s) => s.at < bStart).map((s) => s.ms);
    const during = steps.filter((s) => s.at >= bStart && s.at <= bFirst).map((s) => s.ms);
    const qa = quantiles(alone), qd = quantiles(during);
    results.background = {
      prefillTokens: background, bTtftMs: b?.ttftMs ?? null, bPrefillMs: b?.prefillMs ?? null, bFinished: b !== null,
      bPrefilledTokens: b ? background : bPrefilled, bElapsedMs: bFirst - bStart, aMaxTokensPerCall: bgTokens, aCalls: aCalls.length,
      aloneMsPerToken: qa, duringMsPerToken: qd, ratioOfMedians: qd.median / qa.median, ratioOfP90: qd.p90 / qa.p90, ratioOfMeans: qd.mean / qa.mean, ratioOfMeanToMedianAlone: qd.mean / qa.median,
      aTokensDuringPrefill: during.length,
    };
    const bWhat = b ? `${b.ttftMs.toFixed(0)} ms to its first token` : `cancelled after ${((bFirst - bStart) / 1000).toFixed(0)} s at ${bPrefilled} tokens`;
    log(`while a ${background}-token prompt prefilled (${bWhat}): the decoding session's ms/token ` +
      `median ${qd.median.toFixed(1)} p90 ${qd.p90.toFixed(1)} max ${qd.max.toFixed(1)} over ${qd.n} tokens; alone median ${qa.median.toFixed(1)} p90 ${qa.p90.toFixed(1)}; ` +
      `ratio of medians ${(qd.median / qa.median).toFixed(2)}; mean ${qd.mean.toFixed(1)} against ${qa.mean.toFixed(1)} alone, ratio of means ${(qd.mean / qa.mean).toFixed(2)} (of the mean to the median alone ${(qd.mean / qa.median).toFixed(2)}: a stall before the prompt moves the mean alone)`);
  }
  console.log(table.join("\n"));
  // Closes are logged after their streams end: the last one a moment later.
  await new Promise((resolve) => setTimeout(resolve, 1000));
  const timeline = sessionTimeline(tiers.compute.output);
  results.sessions = timeline;
  if (timeline.some((t) => t.previousClose)) {
    const t2 = ["| session | kvstore ms | open ms | previous session's close: ms (engine, unmap, kvstore release) | of it after this creation began |", "| --- | ---: | ---: | --- | ---: |"];
    for (const t of timeline) {
      const p = t.previousClose;
      t2.push(`| ${t.session} | ${t.kvstoreMs ?? ""} | ${t.openMs ?? ""} | ${p ? `${p.closeMs} (${p.engineCloseMs}, ${p.unmapMs}, ${p.releaseMs})` : ""} | ${p ? p.overlapMs : ""} |`);
    }
    console.log(t2.join("\n"));
  } else if (args["log-level"] !== "debug") log("(--log-level debug adds each session's creation beside its predecessor's close)");
  completed = true;
} finally {
  writeResults(completed);
  client.close();
  await tiers.stop();
  writeFileSync(`${out}.services.log`, [...tiers.kvstore.output, ...tiers.compute.output].join("\n") + "\n");
}

log(`wrote ${out}`);
