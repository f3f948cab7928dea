/**
 * The compute process is killed (SIGKILL, no drain) in the middle of a session; a new compute
 * started against the same kvstore re-attaches the session from the kvstore's segments and
 * continues with the same outputs as an engine that was never interrupted (run here, in this
 * process, over its own segments, on the same inputs). The budget is smaller than the context,
 * so selection, speculation and correction state all have to survive.
 */
import { afterAll, describe, expect, it } from "vitest";
import { loadAddon, type Engine } from "../../native/binding.js";
import { attachLocalHost, type LocalHost } from "../../services/compute/model/localHost.js";
import { resolveRetrieval, toNativeRetrieval } from "../../services/common/retrieval.js";
import { toNativeGeometry } from "../../services/common/geometry.js";
import { AttentionStream, f32Tensor, tensorToF32 } from "../helpers/attention-stream.js";
import { relError as relativeError } from "../../tools/reference/attention.js";
import { gaussian, prng, randomF32 } from "../helpers/prng.js";
import { ATTENTION, QUIET, computeClient, kvstoreClient, startService, startTiers, unary, type ServiceProcess, type Tiers } from "../helpers/services.js";
import { Metadata } from "@grpc/grpc-js";
import { GenerateRequest } from "../../proto/gen/freekv/v1/compute.js";

const addon = loadAddon();
const G = { layers: 2, queryHeads: 4, kvHeads: 2, headDim: 32, kvDtype: 1 };
const R = { pageSize: 16, sinkTokens: 16, windowTokens: 32, selectTokens: 64, tau: 0.9, tauSet: true };
const KV = G.kvHeads * G.headDim;
const QD = G.queryHeads * G.headDim;
const MAX = 512;
const ENV = { ...QUIET, FREEKV_THREADS: "2" };

let tiers: Tiers | undefined;
let second: ServiceProcess | undefined;
const local: LocalHost[] = [];

afterAll(async () => {
  await second?.stop();
  await tiers?.stop();
  for (const h of local) await h.release();
});

/** Queries that drift (adjacent cosine mostly above tau) with an occasional jump. */
function queries(n: number, rand: () => number): Float32Array[] {
  const g = gaussian(rand);
  const out: Float32Array[] = [];
  let q = randomF32(QD, rand);
  for (let i = 0; i < n; i++) {
    const jump = i % 5 === 4;
    const next = new Float32Array(QD);
    for (let j = 0; j < QD; j++) next[j] = jump ? g() : q[j] + 0.25 * g();
    q = next;
    out.push(q);
  }
  return out;
}

describe("compute restart", () => {
  it("a killed compute's sessions are re-attached and continue with identical outputs", async () => {
    const rand = prng(0xc0ffee);
    const N = 300;
    const STEPS = 12;
    const prefill = Array.from({ length: G.layers }, () => ({ k: randomF32(N * KV, rand), v: randomF32(N * KV, rand) }));
    const qs = Array.from({ length: G.layers }, () => queries(STEPS, rand));
    const kvs = Array.from({ length: STEPS }, () => Array.from({ length: G.layers }, () => ({ k: randomF32(KV, rand), v: randomF32(KV, rand) })));

    // The uninterrupted reference: an engine in this process over its own segments.
    const retrieval = resolveRetrieval(R as never, G.layers);
    const cap = Math.ceil(MAX / R.pageSize);
    const attached = attachLocalHost(toNativeGeometry(G as never), toNativeRetrieval(retrieval), cap, "restart-ref");
    local.push(attached);
    const host = attached.host;
    const engine: Engine = new addon.Engine({ backend: "cpu", threads: 2 });
    const ref = engine.createSession(toNativeGeometry(G as never), toNativeRetrieval(retrieval), host, false);
    for (let layer = 0; layer < G.layers; layer++) await engine.prefill(ref, layer, prefill[layer].k, prefill[layer].v, N);
    const expected: Float32Array[][] = [];
    for (let t = 0; t < STEPS; t++) {
      const row: Float32Array[] = [];
      for (let layer = 0; layer < G.layers; layer++) {
        const [o] = await engine.decode(layer, [{ session: ref, q: qs[layer][t], k: kvs[t][layer].k, v: kvs[t][layer].v }]);
        row.push(o);
      }
      expected.push(row);
    }
    const refStats = engine.stats(ref);
    engine.closeSession(ref);

    // The same inputs through the services, with a SIGKILL of compute half-way.
    tiers = await startTiers({ kvstoreEnv: QUIET, computeEnv: ENV });
    let compute = computeClient(tiers.compute.address);
    await unary(compute, "createSession", { sessionId: "survivor", kind: ATTENTION, geometry: G, retrieval: R, maxContextTokens: MAX });
    let s = new AttentionStream(compute);
    for (let layer = 0; layer < G.layers; layer++) {
      await s.prefill("survivor", layer, f32Tensor(prefill[layer].k, [N, G.kvHeads, G.headDim]), f32Tensor(prefill[layer].v, [N, G.kvHeads, G.headDim]));
    }
    const got: Float32Array[][] = [];
    const step = async (t: number) => {
      const row: Float32Array[] = [];
      for (let layer = 0; layer < G.layers; layer++) {
        const [o] = await s.decode(layer, [
          {
            sessionId: "survivor",
            q: f32Tensor(qs[layer][t], [G.queryHeads, G.headDim]),
            k: f32Tensor(kvs[t][layer].k, [G.kvHeads, G.headDim]),
            v: f32Tensor(kvs[t][layer].v, [G.kvHeads, G.headDim]),
          },
        ]);
        row.push(tensorToF32(o));
      }
      got.push(row);
    };
    for (let t = 0; t < STEPS / 2; t++) await step(t);
    await tiers.compute.stop("SIGKILL");
    compute.close();

    second = await startService("compute", {
      env: { ...ENV, FREEKV_COMPUTE_PORT: "0", FREEKV_COMPUTE_METRICS_PORT: "0", FREEKV_KVSTORE_ADDR: tiers.kvstore.address },
    });
    compute = computeClient(second.address);
    const after = await unary<{ session: { contextTokens: number } }>(compute, "getSession", { sessionId: "survivor" });
    expect(after.session.contextTokens).toBe(N + STEPS / 2);
    s = new AttentionStream(compute);
    for (let t = STEPS / 2; t < STEPS; t++) await step(t);
    await s.close();

    let worst = 0;
    for (let t = 0; t < STEPS; t++) for (let layer = 0; layer < G.layers; layer++) worst = Math.max(worst, relativeError(got[t][layer], expected[t][layer]));
    expect(worst).toBeLessThan(1e-6);
    // The run exercised retrieval: pages were recalled and some selections corrected.
    expect(refStats.pagesRecalled).toBeGreaterThan(0);
    expect(refStats.corrections).toBeGreaterThan(0);
    expect(refStats.corrections).toBeLessThan(refStats.selections);
    await unary(compute, "closeSession", { sessionId: "survivor" });
    compute.close();
  });

  it("a layer's pages are committed only once every layer holds them: a compute killed with layer 0 ahead leaves nothing that a re-attach overwrites under its checksum", async () => {
    const rand = prng(0x1a7e);
    const t = await startTiers({ kvstoreEnv: { ...QUIET, FREEKV_SCRUB_BYTES_PER_S: String(64 << 20) }, computeEnv: ENV });
    let next: ServiceProcess | undefined;
    try {
      const kv = kvstoreClient(t.kvstore.address);
      const committed = async () => Number((await unary<{ committedPages: number }>(kv, "getStats", {})).committedPages);
      const N = 100; // six full pages of 16
      const kvOf = (n: number) => [f32Tensor(randomF32(n * KV, rand), [n, G.kvHeads, G.headDim]), f32Tensor(randomF32(n * KV, rand), [n, G.kvHeads, G.headDim])] as const;
      let c = computeClient(t.compute.address);
      await unary(c, "createSession", { sessionId: "ahead", kind: ATTENTION, geometry: G, retrieval: R, maxContextTokens: MAX });
      let st = new AttentionStream(c);
      await st.prefill("ahead", 0, ...kvOf(N));
      // Layer 1 holds nothing yet: layer 0's full pages wait for it.
      await new Promise((r) => setTimeout(r, 300));
      expect(await committed()).toBe(0);
      await t.compute.stop("SIGKILL");
      c.close();
      next = await startService("compute", { env: { ...ENV, FREEKV_COMPUTE_PORT: "0", FREEKV_COMPUTE_METRICS_PORT: "0", FREEKV_KVSTORE_ADDR: t.kvstore.address } });
      c = computeClient(next.address);
      // Re-attached at the fewest tokens any layer held: the client sends layer 0 again, other K/V this time.
      expect((await unary<{ session: { contextTokens: number } }>(c, "getSession", { sessionId: "ahead" })).session.contextTokens).toBe(0);
      st = new AttentionStream(c);
      for (let layer = 0; layer < G.layers; layer++) await st.prefill("ahead", layer, ...kvOf(N));
      const t0 = Date.now();
      while ((await committed()) < G.layers * 6 && Date.now() - t0 < 10_000) await new Promise((r) => setTimeout(r, 50));
      expect(await committed()).toBe(G.layers * 6);
      // The scrubber has re-read the committed pages (a few KB at 64 MiB/s): none disagrees with its checksum.
      await new Promise((r) => setTimeout(r, 1000));
      const [o] = await st.decode(0, [
        { sessionId: "ahead", q: f32Tensor(randomF32(QD, rand), [G.queryHeads, G.headDim]), k: f32Tensor(randomF32(KV, rand), [G.kvHeads, G.headDim]), v: f32Tensor(randomF32(KV, rand), [G.kvHeads, G.headDim]) },
      ]);
      expect(tensorToF32(o).length).toBe(QD);
      await st.close();
      await unary(c, "closeSession", { sessionId: "ahead" });
      c.close();
      kv.close();
    } finally {
      await next?.stop();
      await t.stop();
    }
  }, 120_000);

  it("a stateless Generate's session left by a killed compute is released by the next one, not re-attached", async () => {
    const t = await startTiers({ kvstoreEnv: QUIET, computeEnv: ENV });
    let next: ServiceProcess | undefined;
    try {
      const kv = kvstoreClient(t.kvstore.address);
      const listed = async () => (await unary<{ sessionIds: string[] }>(kv, "listSessions", {})).sessionIds;
      const before = await listed();
      const computeEnv = { ...ENV, FREEKV_LOG_LEVEL: "info", FREEKV_SHUTDOWN_GRACE_MS: "300", FREEKV_COMPUTE_PORT: "0", FREEKV_COMPUTE_METRICS_PORT: "0", FREEKV_KVSTORE_ADDR: t.kvstore.address };
      // A long stateless request, killed with its compute once its first tokens arrived.
      let c = computeClient(t.compute.address);
      const call = c.generate(GenerateRequest.fromPartial({ prompt: { $case: "tokens", value: { ids: Array.from({ length: 40 }, (_, i) => 3 + ((i * 37) % 400)) } }, maxTokens: 2000 }), new Metadata(), { deadline: Date.now() + 60_000 });
      await new Promise<void>((resolve, reject) => {
        call.on("data", () => resolve());
        call.on("error", reject);
      });
      call.on("error", () => undefined);
      const during = (await listed()).filter((id) => !before.includes(id));
      expect(during).toHaveLength(1);
      // A named session beside it, which must survive the restart.
      await unary(c, "createSession", { sessionId: "named-keeper", kind: ATTENTION, geometry: G, retrieval: R, maxContextTokens: MAX });
      await t.compute.stop("SIGKILL");
      c.close();
      next = await startService("compute", { env: computeEnv });
      expect(next.output.join("\n")).toMatch(new RegExp(`"session":"${during[0]}".*released a stateless request's session left by the previous compute`));
      expect(await listed()).not.toContain(during[0]);
      expect(await listed()).toContain("named-keeper");
      // A drain whose grace period ends during such a request leaves nothing of it either.
      c = computeClient(next.address);
      const cut = c.generate(GenerateRequest.fromPartial({ prompt: { $case: "tokens", value: { ids: Array.from({ length: 40 }, (_, i) => 5 + ((i * 53) % 400)) } }, maxTokens: 2000 }), new Metadata(), { deadline: Date.now() + 60_000 });
      cut.on("error", () => undefined);
      await new Promise<void>((resolve) => cut.once("data", () => resolve()));
      const ongoing = (await listed()).filter((id) => id !== "named-keeper");
      expect(ongoing).toHaveLength(1);
      await next.stop("SIGTERM");
      c.close();
      expect(await listed(), next.output.slice(-15).join("\n")).not.toContain(ongoing[0]);
      next = await startService("compute", { env: computeEnv });
      c = computeClient(next.address);
      expect((await unary<{ session: { sessionId: string } }>(c, "getSession", { sessionId: "named-keeper" })).session.sessionId).toBe("named-keeper");
      await unary(c, "closeSession", { sessionId: "named-keeper" });
      c.close();
      kv.close();
    } finally {
      await next?.stop();
      await t.stop();
    }
  }, 120_000);
});
