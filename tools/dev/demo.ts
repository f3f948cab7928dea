/**
 * `npm run demo`: the README's main job. Starts the kvstore and compute as two processes, waits
 * for both to report SERVING, then drives real requests through them and prints what crossed
 * which process:
 *   1. an attention session: compute asks the kvstore for its shared-memory segments and maps
 *      them; an Attention stream prefills keys/values and runs decode steps whose outputs are
 *      checked against exact float64 attention; the pages the engine offloaded are committed at
 *      the kvstore and read back here from the segment; then compute is killed (SIGKILL), a new
 *      one re-attaches the session from the kvstore and the decode continues;
 *   2. a Generate call with the served model: the committed trained model (models/retrieval-8m)
 *      unless FREEKV_MODEL says otherwise; with it, a needle question over a ~2K-token prompt,
 *      answered with FreeKV retrieval attending 192 of its tokens (and, for contrast, with only
 *      the sink and window pages of the same budget);
 * then shows health and a metrics excerpt, shuts both down with SIGTERM and checks that they
 * exited 0 and that the segments are gone. Exits non-zero if any check fails.
 */
import { readdirSync } from "node:fs";
import { credentials, Metadata, type ServiceError } from "@grpc/grpc-js";
import { AttentionStream } from "../client/attention-stream.js";
import { loadAddon } from "../../native/binding.js";
import { DType, type Tensor } from "../../proto/gen/freekv/v1/common.js";
import {
  AttentionRequest,
  ComputeServiceClient,
  CreateSessionRequest,
  GenerateRequest,
  SessionKind,
  type AttentionResponse,
  type GenerateResponse,
  type Session,
} from "../../proto/gen/freekv/v1/compute.js";
import { KvStoreClient } from "../../services/compute/kvstore-client.js";
import { exactAttention, relError } from "../reference/attention.js";
import { healthCheck } from "./health-probe.js";
import { startService, type ServiceProcess } from "./launch.js";
import { runTiers } from "./run.js";
import { mulberry32Uint } from "../reference/prng.js";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { RetrievalMode } from "../../proto/gen/freekv/v1/common.js";
import { trainedModelDir } from "../../services/compute/model/loader.js";
import { Filler } from "../tasks/filler.js";
import { generateTask } from "../tasks/generate.js";

// The KV dtype is left to the backend (float32 on CPU, bf16 on CUDA).
const G = { layers: 2, queryHeads: 8, kvHeads: 2, headDim: 64, kvDtype: DType.D_TYPE_UNSPECIFIED };
const R = { pageSize: 32, sinkTokens: 64, windowTokens: 64, selectTokens: 256 };
const PROMPT = 2048;
const STEPS = 16;
const KV = G.kvHeads * G.headDim;
const QD = G.queryHeads * G.headDim;

let failures = 0;
/** Segment names this run saw, checked to be gone at the end. */
const seen = new Set<string>();
const say = (s = "") => process.stdout.write(`${s}\n`);
const check = (ok: boolean, what: string) => {
  say(`  ${ok ? "ok  " : "FAIL"} ${what}`);
  if (!ok) failures++;
};
const mib = (b: number) => `${(b / 1048576).toFixed(2)} MiB`;

/** Seeded normal numbers. */
function rng(seed: number) {
  const bits = mulberry32Uint(seed);
  const u = () => (bits() + 0.5) / 4294967296;
  return () => Math.sqrt(-2 * Math.log(u())) * Math.cos(2 * Math.PI * u());
}

const tensor = (a: Float32Array, shape: number[]): Tensor => ({ dtype: DType.D_TYPE_FLOAT32, shape, data: Buffer.from(a.buffer, a.byteOffset, a.byteLength) });
const f32 = (t: Tensor) => {
  const o = new Float32Array(t.data.length / 4);
  new Uint8Array(o.buffer).set(t.data);
  return o;
};

function unary<Req, Res>(client: ComputeServiceClient, method: "createSession" | "getSession" | "closeSession", req: Req): Promise<Res> {
  return new Promise((resolve, reject) =>
    (client[method] as unknown as (r: Req, m: Metadata, o: object, cb: (e: ServiceError | null, r: Res) => void) => void).call(client, req, new Metadata(), { deadline: Date.now() + 30000 }, (e, r) => (e ? reject(e) : resolve(r))),
  );
}

/**
 * Keys with structure, so that attention is peaked as in real heads: every page has a topic
 * direction; queries drift around one topic and jump to another now and then. Selection then
 * has something to find, and the output with a budget of 384 of 2064 tokens stays close to exact.
 */
function workload(seed: number) {
  const g = rng(seed);
  const topics = Array.from({ length: 12 }, () => Float32Array.from({ length: G.headDim }, () => g()));
  const pageTopic = Array.from({ length: Math.ceil((PROMPT + STEPS) / R.pageSize) }, () => Math.floor(Math.abs(g() * 1000)) % topics.length);
  const key = (t: number) => {
    const k = new Float32Array(KV);
    const topic = topics[pageTopic[Math.floor(t / R.pageSize)]];
    for (let h = 0; h < G.kvHeads; h++) for (let d = 0; d < G.headDim; d++) k[h * G.headDim + d] = 0.9 * topic[d] + 0.5 * g();
    return k;
  };
  // Values carry their page's topic too (as in real heads), plus noise.
  const topicValues = topics.map(() => Float32Array.from({ length: KV }, () => g()));
  const value = (t: number) => {
    const tv = topicValues[pageTopic[Math.floor(t / R.pageSize)]];
    return Float32Array.from({ length: KV }, (_, i) => tv[i] + 0.5 * g());
  };
  let focus = 0;
  const query = (step: number) => {
    if (step % 6 === 5) focus = (focus + 5) % topics.length;
    const q = new Float32Array(QD);
    for (let h = 0; h < G.queryHeads; h++) for (let d = 0; d < G.headDim; d++) q[h * G.headDim + d] = 1.6 * topics[focus][d] + 0.3 * g();
    return q;
  };
  return { key, value, query };
}

/** The compute process in use and a client to it (replaced by the restart step). */
interface Live {
  compute: ServiceProcess;
  client: ComputeServiceClient;
  kvstoreAddress: string;
  /** The model folder compute serves (a restarted compute serves it too). */
  modelDir: string;
}

const newClient = (address: string) => new ComputeServiceClient(address, credentials.createInsecure(), { "grpc.max_receive_message_length": 64 << 20 });

async function attentionPart(live: Live, kv: KvStoreClient): Promise<void> {
  const client = live.client;
  const computeMetricsPort = live.compute.metricsPort;
  say("\n1. An attention session (the per-layer API for disaggregated engines)");
  const shmBefore = await kv.stats();
  const created = await unary<CreateSessionRequest, { session: Session }>(
    client,
    "createSession",
    CreateSessionRequest.fromPartial({ sessionId: "demo-attention", kind: SessionKind.SESSION_KIND_ATTENTION, geometry: G, retrieval: R, maxContextTokens: 4096 }),
  );
  const s = created.session;
  const bf16 = s.geometry!.kvDtype === DType.D_TYPE_BFLOAT16;
  say(`   compute -> kvstore  AttachSession "${s.sessionId}": ${G.layers} layers, ${G.queryHeads} query heads, ${G.kvHeads} KV heads, head dim ${G.headDim}, KV in ${bf16 ? "bf16" : "float32"}`);
  say(`   retrieval: page ${s.retrieval!.pageSize}, sink ${s.retrieval!.sinkTokens}, window ${s.retrieval!.windowTokens}, select ${s.retrieval!.selectTokens}, tau ${s.retrieval!.tau.toFixed(2)}, backend ${s.backend}`);
  const att = await kv.attach({ sessionId: "demo-attention" });
  say("   segments the kvstore created (mode 0600) and compute mapped:");
  for (const seg of [att.store, att.staging, att.tail, att.manifest]) seen.add(seg!.name);
  for (const [name, seg] of [["store", att.store], ["staging", att.staging], ["tail", att.tail], ["manifest", att.manifest]] as const) {
    say(`     ${name.padEnd(8)} /dev/shm${seg!.name}  ${mib(seg!.sizeBytes)}`);
  }
  const stats = await kv.stats();
  check(stats.sessions === shmBefore.sessions + 1, `kvstore now holds ${stats.sessions} session(s), ${mib(stats.segmentBytes)} of shared memory`);

  const w = workload(7);
  const stream = new AttentionStream(client);
  const keys: Float32Array[][] = [[], []];
  const values: Float32Array[][] = [[], []];
  /** One layer of decode step `step` over `s`: the token's K/V appended, the output checked against exact attention. */
  const decodeLayer = async (s: AttentionStream, q: Float32Array, step: number, layer: number): Promise<{ error: number; ms: number }> => {
    const k = w.key(PROMPT + step);
    const v = w.value(PROMPT + step);
    keys[layer].push(k);
    values[layer].push(v);
    const t1 = performance.now();
    const r = await s.send({ op: { $case: "decode", value: { layer, items: [{ sessionId: "demo-attention", q: tensor(q, [G.queryHeads, G.headDim]), k: tensor(k, [G.kvHeads, G.headDim]), v: tensor(v, [G.kvHeads, G.headDim]) }] } } });
    const ms = performance.now() - t1;
    if (r.result?.$case !== "decode") throw new Error("no decode result");
    return { error: relError(f32(r.result.value.outputs[0]), exactAttention(q, keys[layer], values[layer], G.queryHeads, G.kvHeads, G.headDim)), ms };
  };
  const t0 = Date.now();
  for (let layer = 0; layer < G.layers; layer++) {
    const k = new Float32Array(PROMPT * KV);
    const v = new Float32Array(PROMPT * KV);
    for (let t = 0; t < PROMPT; t++) {
      const kt = w.key(t);
      const vt = w.value(t);
      k.set(kt, t * KV);
      v.set(vt, t * KV);
      keys[layer].push(kt);
      values[layer].push(vt);
    }
    await stream.send({ op: { $case: "prefill", value: { sessionId: "demo-attention", layer, k: tensor(k, [PROMPT, G.kvHeads, G.headDim]), v: tensor(v, [PROMPT, G.kvHeads, G.headDim]) } } });
  }
  say(`   Attention stream: prefill ${PROMPT} tokens x ${G.layers} layers (${mib(2 * PROMPT * KV * 4 * G.layers)} of K/V over gRPC) in ${Date.now() - t0} ms`);
  let worst = 0;
  let sum = 0;
  let wire = 0;
  for (let step = 0; step < STEPS; step++) {
    const q = w.query(step);
    for (let layer = 0; layer < G.layers; layer++) {
      const { error, ms } = await decodeLayer(stream, q, step, layer);
      wire += ms;
      worst = Math.max(worst, error);
      sum += error;
    }
  }
  void stream.close();
  const budget = R.sinkTokens + R.selectTokens + R.windowTokens;
  say(`   Attention stream: ${STEPS} decode steps x ${G.layers} layers, ${(wire / (STEPS * G.layers)).toFixed(2)} ms per layer-step round trip from here; each attends ${budget} of ${PROMPT + STEPS} tokens per KV head`);
  check(worst < 0.1, `outputs vs exact float64 attention over all tokens: mean relative error ${(sum / (STEPS * G.layers)).toExponential(2)}, worst ${worst.toExponential(2)}`);
  const metrics = await (await fetch(`http://127.0.0.1:${computeMetricsPort}/metrics`)).text();
  const metric = (name: string) => Number(metrics.split("\n").find((l) => l.startsWith(name))?.split(" ")[1] ?? NaN);
  const serverMs = (1000 * metric('freekv_compute_attention_seconds_sum{service="compute",op="decode"}')) / metric('freekv_compute_attention_seconds_count{service="compute",op="decode"}');
  say(`   inside compute a decode message takes ${serverMs.toFixed(2)} ms (validation, batching window, engine); the rest of the round trip is gRPC and this process`);
  const got = await unary<{ sessionId: string }, { session: Session }>(client, "getSession", { sessionId: "demo-attention" });
  const st = got.session.stats!;
  say(`   engine: ${st.decodeSteps} decode steps, ${st.selections} selections (${st.corrections} corrected, rate ${st.correctionRate.toFixed(2)}), ${st.pagesRecalled} pages recalled (${mib(st.recallBytes)}), hit rate ${st.hitRate.toFixed(2)}, ${st.pagesOffloaded} pages offloaded`);

  // The offloaded pages: committed at the kvstore, and readable from its segment in this process.
  let a = await kv.attach({ sessionId: "demo-attention" });
  for (let i = 0; i < 40 && a.committedPages.some((c) => c < Math.floor((PROMPT + STEPS) / R.pageSize)); i++) {
    await new Promise((r) => setTimeout(r, 50));
    a = await kv.attach({ sessionId: "demo-attention" });
  }
  say(`   kvstore: committed pages per layer ${JSON.stringify(a.committedPages)} (a page is ${mib(a.layout!.pageBytes)} in HND order)`);
  const store = loadAddon().ShmSegment.open(a.store!.name);
  const layer = 1;
  const page = 17;
  const head = 1;
  const byteBase = layer * a.layout!.layerStrideBytes + page * a.layout!.pageBytes + head * a.layout!.headPageBytes;
  // One stored element as float32: float32 as is, bf16 as the high half of a float32.
  const buf = store.buffer();
  const f = new Float32Array(buf);
  const h = new Uint16Array(buf);
  const widen = new Float32Array(1);
  const widenBits = new Uint32Array(widen.buffer);
  const at = (i: number) => {
    if (!bf16) return f[byteBase / 4 + i];
    widenBits[0] = h[byteBase / 2 + i] << 16;
    return widen[0];
  };
  // Exact for float32; within bf16's rounding (2^-8 relative) for bf16.
  const same = (x: number, ref: number) => (bf16 ? Math.abs(x - ref) <= Math.abs(ref) * 2 ** -8 : x === ref);
  let matching = 0;
  for (let t = 0; t < R.pageSize; t++)
    for (let d = 0; d < G.headDim; d++) {
      if (same(at(t * G.headDim + d), keys[layer][page * R.pageSize + t][head * G.headDim + d])) matching++;
      if (same(at((R.pageSize + t) * G.headDim + d), values[layer][page * R.pageSize + t][head * G.headDim + d])) matching++;
    }
  store.close();
  check(
    matching === 2 * R.pageSize * G.headDim,
    `page ${page} of layer ${layer}, KV head ${head}, read here from /dev/shm${a.store!.name}: ${matching}/${2 * R.pageSize * G.headDim} values equal what was sent${bf16 ? " (to bf16 rounding)" : ""}`,
  );
  // The compute process dies without a drain; a new one re-attaches the session from the
  // kvstore's segments and the decode continues where it stopped.
  say(`   compute restart: SIGKILL pid ${live.compute.pid} (no drain), then a new compute against the same kvstore`);
  await live.compute.stop("SIGKILL");
  live.client.close();
  const t2 = Date.now();
  live.compute = await startService("compute", {
    env: { FREEKV_LOG_LEVEL: "warn", FREEKV_COMPUTE_PORT: "0", FREEKV_COMPUTE_METRICS_PORT: "0", FREEKV_KVSTORE_ADDR: live.kvstoreAddress, FREEKV_MODEL: live.modelDir },
    detached: true,
  });
  live.client = newClient(live.compute.address);
  const back = await unary<{ sessionId: string }, { session: Session }>(live.client, "getSession", { sessionId: "demo-attention" });
  check(
    back.session.contextTokens === PROMPT + STEPS,
    `new compute pid ${live.compute.pid} up in ${Date.now() - t2} ms; re-attached "demo-attention" with ${back.session.contextTokens} tokens per layer`,
  );
  const again = new AttentionStream(live.client);
  let worstAfter = 0;
  const MORE = 8;
  for (let step = STEPS; step < STEPS + MORE; step++) {
    const q = w.query(step);
    for (let layer = 0; layer < G.layers; layer++) worstAfter = Math.max(worstAfter, (await decodeLayer(again, q, step, layer)).error);
  }
  void again.close();
  check(worstAfter < 0.1, `${MORE} more decode steps after the restart: worst relative error vs exact ${worstAfter.toExponential(2)}`);
  await unary(live.client, "closeSession", { sessionId: "demo-attention" });
  const after = await kv.stats();
  check(after.sessions === shmBefore.sessions, "CloseSession: compute closed the engine session, the kvstore released the segments");
}

async function generatePart(client: ComputeServiceClient): Promise<void> {
  say("\n2. Generate with the served model");
  const prompt = "The key-value cache of a long context";
  const req = GenerateRequest.fromPartial({ prompt: { $case: "text", value: prompt }, maxTokens: 12, sampling: { temperature: 0 } });
  const t0 = Date.now();
  try {
    const events = await new Promise<GenerateResponse[]>((resolve, reject) => {
      const out: GenerateResponse[] = [];
      const call = client.generate(req, { deadline: Date.now() + 120000 });
      call.on("data", (m: GenerateResponse) => out.push(m));
      call.on("error", reject);
      call.on("end", () => resolve(out));
    });
    const text = events.map((e) => (e.event?.$case === "chunk" ? e.event.value.text : "")).join("");
    const ids = events.flatMap((e) => (e.event?.$case === "chunk" ? e.event.value.tokenIds : []));
    const fin = events.find((e) => e.event?.$case === "final");
    say(`   prompt: ${JSON.stringify(prompt)}`);
    say(`   streamed ${ids.length} tokens in ${Date.now() - t0} ms: ${JSON.stringify(text)} (ids ${ids.slice(0, 12).join(" ")})`);
    if (fin?.event?.$case === "final") {
      const u = fin.event.value.usage!;
      say(`   finish ${fin.event.value.finishReason}, prompt ${u.promptTokens} tokens, prefill ${u.prefillMs.toFixed(1)} ms, decode ${u.decodeMs.toFixed(1)} ms`);
    }
    check(ids.length > 0 && !!fin, "Generate streamed tokens and a final summary");
  } catch (e) {
    const err = e as ServiceError;
    say(`   skipped: ${err.details ?? err.message} (code ${err.code})`);
  }
}

/** One greedy Generate; the streamed text and the final usage. */
async function generateText(client: ComputeServiceClient, req: GenerateRequest): Promise<{ text: string; promptTokens: number; prefillMs: number; ms: number }> {
  const t0 = Date.now();
  const events = await new Promise<GenerateResponse[]>((resolve, reject) => {
    const out: GenerateResponse[] = [];
    const call = client.generate(req, { deadline: Date.now() + 120000 });
    call.on("data", (m: GenerateResponse) => out.push(m));
    call.on("error", reject);
    call.on("end", () => resolve(out));
  });
  const text = events.map((e) => (e.event?.$case === "chunk" ? e.event.value.text : "")).join("");
  const fin = events.find((e) => e.event?.$case === "final");
  const u = fin?.event?.$case === "final" ? fin.event.value.usage : undefined;
  return { text, promptTokens: u?.promptTokens ?? 0, prefillMs: u?.prefillMs ?? 0, ms: Date.now() - t0 };
}

/**
 * A needle in a ~2K-token prompt (the task generator's single_needle family, filler from the
 * GPL's text that Debian ships, or this README), asked of the trained model with a retrieval
 * budget far below the prompt: FreeKV must find the needle's page; sink + window alone cannot.
 */
async function needlePart(client: ComputeServiceClient, modelDir: string): Promise<void> {
  say("\n2b. A needle in a long prompt (the trained model, FreeKV retrieval)");
  if (!existsSync(join(modelDir, "RECIPE.md"))) {
    say(`   skipped: the served model (${modelDir}) is not the trained one; run with FREEKV_MODEL=${trainedModelDir()} (or unset)`);
    return;
  }
  const sources = ["/usr/share/common-licenses/GPL-3", join(trainedModelDir(), "..", "..", "README.md")];
  const source = sources.find((f) => existsSync(f))!;
  const filler = new Filler(readFileSync(source, "utf8"));
  const task = generateTask(filler, { seed: 2026, contextTokens: 2048, contextChars: Math.round(2048 * 3.77), depth: 0.45, family: "single_needle" }, 0);
  const needle = task.prompt.split("\n").flatMap((l) => l.split(/(?<=\.)\s+/)).find((x) => x.includes(task.answer[0]) && x.startsWith("The value of key")) ?? "";
  const question = task.prompt.slice(task.prompt.lastIndexOf("Q:")).trim();
  say(`   filler from ${source}; needle at ${(task.depth * 100).toFixed(0)}% of the prompt: ${JSON.stringify(needle)}`);
  say(`   question: ${JSON.stringify(question)}`);
  const budget = { pageSize: 16, sinkTokens: 32, selectTokens: 128, windowTokens: 32 };
  const ask = (mode: RetrievalMode) =>
    generateText(client, GenerateRequest.fromPartial({ prompt: { $case: "text", value: task.prompt }, maxTokens: task.max_tokens, sampling: { temperature: 0 }, retrieval: { ...budget, mode } }));
  const fk = await ask(RetrievalMode.RETRIEVAL_MODE_FREEKV);
  say(`   freekv (attends ${budget.sinkTokens + budget.selectTokens + budget.windowTokens} of ${fk.promptTokens} tokens): ${JSON.stringify(fk.text.trim())} in ${fk.ms} ms (prefill ${fk.prefillMs.toFixed(0)} ms)`);
  const sw = await ask(RetrievalMode.RETRIEVAL_MODE_SINK_WINDOW);
  say(`   sink + window only, same budget: ${JSON.stringify(sw.text.trim())}`);
  check(fk.text.includes(task.answer[0]), `FreeKV found the needle's value ${task.answer[0]} in a ${fk.promptTokens}-token prompt`);
}

async function main(): Promise<number> {
  const t0 = Date.now();
  say("FreeKV demo: two processes, one request path\n");
  // The trained model unless FREEKV_MODEL names another.
  const modelDir = process.env.FREEKV_MODEL || trainedModelDir();
  const tiers = await runTiers({ ephemeral: true, env: { FREEKV_LOG_LEVEL: "warn", FREEKV_MODEL: modelDir } });
  const { compute, kvstore } = tiers;
  say(`started in ${Date.now() - t0} ms:`);
  say(`  kvstore  pid ${kvstore.pid}  gRPC ${kvstore.address}  metrics :${kvstore.metricsPort}/metrics`);
  say(`  compute  pid ${compute.pid}  gRPC ${compute.address}  metrics :${compute.metricsPort}/metrics  (kvstore at ${kvstore.address})`);
  const live: Live = { compute, client: newClient(compute.address), kvstoreAddress: kvstore.address, modelDir };
  const kv = new KvStoreClient(kvstore.address);
  try {
    const hc = await healthCheck(compute.address);
    const hk = await healthCheck(kvstore.address);
    check(hc === "SERVING" && hk === "SERVING", `grpc.health.v1: compute ${hc}, kvstore ${hk}`);
    await attentionPart(live, kv);
    await generatePart(live.client);
    await needlePart(live.client, modelDir);

    say(`\n3. Metrics excerpt (compute pid ${live.compute.pid}, kvstore pid ${kvstore.pid})`);
    const grab = async (port: number, names: string[]) => {
      const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
      return text.split("\n").filter((l) => !l.startsWith("#") && names.some((n) => l.startsWith(n)));
    };
    for (const l of await grab(live.compute.metricsPort, ["freekv_compute_attention_requests_total", "freekv_compute_decode_batch_size_count", "freekv_compute_decode_layer_seconds_sum", "freekv_compute_attention_seconds_sum", "freekv_compute_attention_seconds_count", "freekv_compute_sessions"])) say(`   compute  ${l}`);
    for (const l of await grab(kvstore.metricsPort, ["freekv_kvstore_commits_total", "freekv_kvstore_sessions", "freekv_kvstore_segment_bytes"])) say(`   kvstore  ${l}`);
  } finally {
    live.client.close();
    kv.close();
    say("\n4. Shutdown (SIGTERM: drain compute, then the kvstore)");
    const c = await live.compute.stop("SIGTERM");
    const k = await kvstore.stop("SIGTERM");
    check(c.code === 0 && k.code === 0, `compute exited ${c.code ?? c.signal}, kvstore exited ${k.code ?? k.signal}`);
    const now = new Set(readdirSync("/dev/shm").map((n) => `/${n}`));
    check(seen.size > 0 && [...seen].every((n) => !now.has(n)), `the ${seen.size} segments of this run are gone from /dev/shm`);
  }
  say(`\n${failures === 0 ? "demo finished: every check passed" : `demo finished: ${failures} check(s) failed`} (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
  return failures === 0 ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (e: unknown) => {
    process.stderr.write(`demo failed: ${(e as Error).stack ?? String(e)}\n`);
    process.exit(1);
  },
);
