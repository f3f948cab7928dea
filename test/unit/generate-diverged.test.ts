/**
 * Generate's model calls that fail, through both services (the kvstore a process, compute in
 * process with the real CPU model):
 * - a decode step or prompt chunk that fails after the model appended (the real call ran, then
 *   the failure): the call gets DATA_LOSS, the named session is marked (GetSession's data_loss,
 *   saved at the kvstore, the counter), its next Generate gets the same DATA_LOSS, and the step is
 *   never run again (it would append the token twice);
 * - a batched step refused by the model's checks (nothing appended) runs again, each session
 *   alone, and every request completes with the tokens it gets unbatched;
 * - a named session made for another model's shapes (re-attached after FREEKV_MODEL changed) gets
 *   FAILED_PRECONDITION from Generate, before the model runs;
 * - a request's own session (no name) whose model call fails that way gets INTERNAL, logged as such;
 * - a failure of the engine's background work is logged and counted after the next model call.
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { Metadata, status, type ServiceError } from "@grpc/grpc-js";
import type { Registry } from "prom-client";
import type { Model } from "../../native/binding.js";
import { GenerateRequest, type GenerateResponse, type GetSessionResponse, type Session } from "../../proto/gen/freekv/v1/compute.js";
import type { AttachSessionResponse } from "../../proto/gen/freekv/v1/kvstore.js";
import { parseConfig } from "../../services/common/config.js";
import { bindServer } from "../../services/common/lifecycle.js";
import { createRegistry } from "../../services/common/metrics.js";
import { computeConfigSchema } from "../../services/compute/config.js";
import { createContext, loadServedModel, type ComputeContext } from "../../services/compute/context.js";
import { createComputeServer, type ComputeServer } from "../../services/compute/server.js";
import { capturedLogger } from "../helpers/log.js";
import { prng } from "../helpers/prng.js";
import { TINY_LLAMA } from "../helpers/tiny-model.js";
import { QUIET, computeClient, kvstoreClient, registryValue, startService, unary, type ServiceProcess } from "../helpers/services.js";

const seed = Number(process.env.FREEKV_TEST_SEED) || (Date.now() ^ (process.pid << 9)) >>> 0;
const rand = prng(seed);
const MODEL = TINY_LLAMA;
const MODEL_KIND = 1; // SessionKind.SESSION_KIND_MODEL

let kvstore: ServiceProcess;
let kv: ReturnType<typeof kvstoreClient>;
let ctx: ComputeContext;
let registry: Registry;
let srv: ComputeServer;
let compute: ReturnType<typeof computeClient>;
const lines: Array<Record<string, unknown>> = [];
let model: Model;
/** Injected failures of the model's calls (after the real call ran, or before it as a refusal). */
let failNext: { op: "decode" | "prefill"; after: boolean; refused?: boolean; minBatch?: number } | undefined;
const calls: Array<{ op: string; sessions: number[] }> = [];

beforeAll(async () => {
  kvstore = await startService("kvstore", { env: { ...QUIET, FREEKV_KVSTORE_PORT: "0", FREEKV_KVSTORE_METRICS_PORT: "0" } });
  kv = kvstoreClient(kvstore.address);
  const log = capturedLogger(lines);
  const config = parseConfig(computeConfigSchema, { FREEKV_KVSTORE_ADDR: kvstore.address, FREEKV_MODEL: MODEL, FREEKV_THREADS: "2" });
  registry = createRegistry("compute");
  ctx = createContext(config, log, registry);
  srv = createComputeServer(ctx);
  const address = `127.0.0.1:${await bindServer(srv.server, "127.0.0.1", 0)}`;
  srv.upstream(true);
  expect(await loadServedModel(ctx)).toBe(true);
  compute = computeClient(address);
  // The real model, whose next matching call fails as failNext says.
  model = ctx.served.get().loaded.model;
  for (const op of ["decode", "decodeArgmax", "prefill"] as const) {
    const real = (model[op] as (...a: unknown[]) => Promise<unknown>).bind(model);
    Object.defineProperty(model, op, {
      configurable: true,
      value: async (...args: unknown[]) => {
        const sessions = op === "prefill" ? [args[0] as number] : Array.from(args[0] as Int32Array);
        calls.push({ op, sessions });
        const f = failNext;
        const kind = op === "prefill" ? "prefill" : "decode";
        if (!f || f.op !== kind || sessions.length < (f.minBatch ?? 1)) return real(...args);
        failNext = undefined;
        if (f.refused) throw Object.assign(new Error(`refused by a check (seed ${seed})`), { refused: true });
        await real(...args);
        throw new Error(`the model failed after its layers ran (seed ${seed})`);
      },
    });
  }
}, 120_000);

afterAll(async () => {
  compute?.close();
  srv?.server.forceShutdown();
  await ctx?.sessions.shutdown();
  ctx?.kvstore.close();
  kv?.close();
  await kvstore?.stop();
});

// A failure a test left unused does not fall on the next test's calls.
afterEach(() => {
  failNext = undefined;
});

const ids = (n: number) => Array.from({ length: n }, () => 3 + Math.floor(rand() * 200));

/**
 * A Generate call: its token ids, or its error. The tiny model's EOS does not end it (an EOS
 * drawn as the first token would leave no decode step for the failure injected into one).
 */
function generate(req: Partial<GenerateRequest>): Promise<{ tokens: number[]; error?: ServiceError }> {
  return new Promise((resolve) => {
    const tokens: number[] = [];
    const call = compute.generate(GenerateRequest.fromPartial({ ignoreEos: true, ...req }), new Metadata(), { deadline: Date.now() + 30_000 });
    call.on("data", (r: GenerateResponse) => {
      if (r.event?.$case === "chunk") tokens.push(...r.event.value.tokenIds);
    });
    call.on("error", (error: ServiceError) => resolve({ tokens, error }));
    call.on("end", () => resolve({ tokens }));
  });
}

const getSession = async (id: string) => (await unary<{ session: Session }>(compute, "getSession", { sessionId: id }) as GetSessionResponse).session!;
const metric = (name: string) => registryValue(registry, name);
let next = 0;
const newId = () => `gdv-${seed}-${next++}`;

describe(`Generate's failed model calls (seed ${seed})`, () => {
  for (const op of ["decode", "prefill"] as const) {
    it(`a ${op === "decode" ? "decode step" : "prompt chunk"} that fails after the model appended marks the named session diverged; its calls get DATA_LOSS and the call is not run again`, async () => {
      const id = newId();
      await unary(compute, "createSession", { sessionId: id, kind: MODEL_KIND, maxContextTokens: 512 });
      // A first turn that succeeds.
      const first = await generate({ sessionId: id, prompt: { $case: "tokens", value: { ids: ids(5 + Math.floor(rand() * 20)) } }, maxTokens: 3 });
      expect(first.error).toBeUndefined();
      const before = await metric("freekv_compute_sessions_diverged_total");
      const engineSession = ctx.sessions.get(id).engineSession;
      const from = calls.length;
      failNext = { op, after: true };
      const failed = await generate({ sessionId: id, prompt: { $case: "tokens", value: { ids: ids(3 + Math.floor(rand() * 10)) } }, maxTokens: 4 });
      expect(failNext, "the injected failure was used").toBeUndefined();
      expect(failed.error?.code).toBe(status.DATA_LOSS);
      expect(failed.error?.details).toMatch(op === "decode" ? /a decode step of the model failed in the engine .* after it may have appended the token/ : /a prompt chunk of the model failed in the engine .* after it may have appended its tokens/);
      // The failed call ran once: nothing of this session was run again after it.
      const after = calls.slice(from).filter((c) => c.sessions.includes(engineSession));
      expect(after.at(-1)?.op).toBe(op === "decode" ? "decodeArgmax" : "prefill");
      expect(after.filter((c) => (op === "decode" ? c.op !== "prefill" : c.op === "prefill")).length).toBe(op === "decode" ? 1 : after.length);
      expect((await getSession(id)).dataLoss).toBe(failed.error?.details);
      expect(await metric("freekv_compute_sessions_diverged_total")).toBe(before + 1);
      expect(lines.some((l) => l.level === "warn" && /session diverged/.test(String(l.msg)) && l.session === id)).toBe(true);
      // Saved at the kvstore with the session's metadata, for a compute that re-attaches it.
      const saved = await unary<AttachSessionResponse>(kv, "attachSession", { sessionId: id });
      expect(JSON.parse(Buffer.from(saved.metadata).toString("utf8")).dataLoss).toBe(failed.error?.details);
      // The next turn is refused the same way, before the model runs.
      const n = calls.length;
      const again = await generate({ sessionId: id, prompt: { $case: "tokens", value: { ids: ids(3) } }, maxTokens: 2 });
      expect(again.error?.code).toBe(status.DATA_LOSS);
      expect(again.error?.details).toBe(failed.error?.details);
      expect(calls.slice(n).some((c) => c.sessions.includes(engineSession))).toBe(false);
      await unary(compute, "closeSession", { sessionId: id });
    });
  }

  it("a request's own session whose model call fails after it appended: INTERNAL, logged as an internal error, no session marked", async () => {
    const before = await metric("freekv_compute_sessions_diverged_total");
    failNext = { op: rand() < 0.5 ? "decode" : "prefill", after: true };
    const r = await generate({ prompt: { $case: "tokens", value: { ids: ids(4 + Math.floor(rand() * 10)) } }, maxTokens: 3 });
    expect(failNext).toBeUndefined();
    expect(r.error?.code).toBe(status.INTERNAL);
    expect(r.error?.details).toMatch(/failed in the model \(the model failed after its layers ran/);
    expect(lines.some((l) => l.level === "error" && l.msg === "internal error" && /failed in the model/.test(String((l.err as { message?: string })?.message)))).toBe(true);
    expect(await metric("freekv_compute_sessions_diverged_total")).toBe(before);
  });

  it("a batched step refused by the model's checks runs again, each session alone, and every request completes as unbatched", async () => {
    const prompts = [ids(6 + Math.floor(rand() * 10)), ids(6 + Math.floor(rand() * 10)), ids(6 + Math.floor(rand() * 10))];
    const alone = [];
    for (const p of prompts) alone.push(await generate({ prompt: { $case: "tokens", value: { ids: p } }, maxTokens: 6 }));
    for (const r of alone) expect(r.error).toBeUndefined();
    failNext = { op: "decode", after: false, refused: true, minBatch: 2 };
    const together = await Promise.all(prompts.map((p) => generate({ prompt: { $case: "tokens", value: { ids: p } }, maxTokens: 6 })));
    expect(failNext, "a batch of two or more formed and was refused").toBeUndefined();
    for (let i = 0; i < prompts.length; i++) {
      expect(together[i].error).toBeUndefined();
      expect(together[i].tokens).toEqual(alone[i].tokens);
    }
  });

  it("a named session made for another model's shapes gets FAILED_PRECONDITION from Generate, before the model runs", async () => {
    const id = newId();
    const g = ctx.served.geometry();
    const other = { ...g, headDim: g.headDim * 2 };
    const made = await unary<AttachSessionResponse>(kv, "attachSession", {
      sessionId: id,
      geometry: other,
      retrieval: { pageSize: 16, sinkTokens: 32, windowTokens: 32, selectTokens: 64 },
      maxContextTokens: 256,
      metadata: Buffer.from(JSON.stringify({ kind: "model" })),
    });
    expect(made.created).toBe(true);
    try {
      // As a compute restarted with another FREEKV_MODEL re-attaches the kvstore's sessions at start.
      const s = await ctx.sessions.reattach(id);
      expect(s.geometry.headDim).toBe(other.headDim);
      const n = calls.length;
      const r = await generate({ sessionId: id, prompt: { $case: "tokens", value: { ids: ids(4) } }, maxTokens: 2 });
      expect(r.error?.code).toBe(status.FAILED_PRECONDITION);
      expect(r.error?.details).toMatch(/was made for a model of .* head dim 32; this compute serves .* 16$/);
      expect(calls.length).toBe(n);
    } finally {
      if (ctx.sessions.list().some((s) => s.id === id)) await ctx.sessions.close(id).catch(() => undefined);
      await unary(kv, "releaseSession", { sessionId: id }).catch(() => undefined);
    }
  });

  it("a failure of the engine's background work is logged and counted after the next model call", async () => {
    const engine = ctx.engine;
    const take = engine.takeBackgroundFailures.bind(engine);
    const message = `registering the host store ahead failed (seed ${seed})`;
    const dropped = 2 + Math.floor(rand() * 5);
    let pending = { failures: [{ session: 12345, message }], dropped };
    Object.defineProperty(engine, "takeBackgroundFailures", {
      configurable: true,
      value: () => {
        const real = take();
        const out = { failures: [...pending.failures, ...real.failures], dropped: pending.dropped + real.dropped };
        pending = { failures: [], dropped: 0 };
        return out;
      },
    });
    try {
      const before = await metric("freekv_compute_engine_background_failures_total");
      const r = await generate({ prompt: { $case: "tokens", value: { ids: ids(5) } }, maxTokens: 2 });
      expect(r.error).toBeUndefined();
      expect(await metric("freekv_compute_engine_background_failures_total")).toBe(before + 1 + dropped);
      expect(lines.filter((l) => l.level === "warn" && l.err === message && l.engineSession === 12345)).toHaveLength(1);
      expect(lines.filter((l) => l.level === "warn" && l.failures === dropped && /counted, not kept/.test(String(l.msg)))).toHaveLength(1);
    } finally {
      Object.defineProperty(engine, "takeBackgroundFailures", { configurable: true, value: take });
    }
  });
});
