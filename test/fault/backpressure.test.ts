/**
 * Write backpressure of the Attention stream: a client that stops reading makes the server stop
 * producing (it waits for 'drain' and pauses reading) instead of buffering every response in
 * memory; once the client reads again, every response arrives, in order.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AttentionStream, f32Tensor } from "../helpers/attention-stream.js";
import { prng, randomF32 } from "../helpers/prng.js";
import { ATTENTION, QUIET, computeClient, fetchMetrics, metricValue, startTiers, unary, type Tiers } from "../helpers/services.js";

// Big outputs (16 heads x 1024 x 4 bytes = 64 KiB per decode) so the transport fills quickly.
const G = { layers: 1, queryHeads: 16, kvHeads: 1, headDim: 1024, kvDtype: 1 };
const R = { pageSize: 16, sinkTokens: 16, windowTokens: 16, selectTokens: 64 };
const N = 400;

let tiers: Tiers;
beforeAll(async () => {
  tiers = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...QUIET, FREEKV_MODEL: "none", FREEKV_DECODE_BATCH_WINDOW_US: "0" } });
});
afterAll(async () => {
  await tiers?.stop();
});

describe("Attention stream backpressure", () => {
  it("a client that stops reading stalls the server; reading again gets every response in order", async () => {
    const compute = computeClient(tiers.compute.address);
    await unary(compute, "createSession", { sessionId: "bp", kind: ATTENTION, geometry: G, retrieval: R, maxContextTokens: N + 64 });
    const s = new AttentionStream(compute);
    const rand = prng(11);
    const KV = G.kvHeads * G.headDim;
    await s.prefill("bp", 0, f32Tensor(randomF32(8 * KV, rand), [8, 1, G.headDim]), f32Tensor(randomF32(8 * KV, rand), [8, 1, G.headDim]));
    s.pause();
    const q = f32Tensor(randomF32(G.queryHeads * G.headDim, rand), [G.queryHeads, G.headDim]);
    const kv = f32Tensor(randomF32(KV, rand), [1, G.headDim]);
    const replies: Promise<unknown>[] = [];
    for (let i = 0; i < N; i++) replies.push(s.decode(0, [{ sessionId: "bp", q, k: kv, v: kv }]));
    const served = async () => metricValue(await fetchMetrics(tiers.compute.metricsPort), "freekv_compute_attention_requests_total", 'op="decode"') ?? 0;
    // Let the server run until it stalls.
    let last = -1;
    let now = await served();
    for (let i = 0; i < 40 && now !== last; i++) {
      await new Promise((r) => setTimeout(r, 250));
      last = now;
      now = await served();
    }
    expect(now).toBeGreaterThan(0);
    expect(now).toBeLessThan(N); // stalled: not every response was produced and buffered
    s.resume();
    const outs = await Promise.all(replies);
    expect(outs).toHaveLength(N);
    expect(await served()).toBe(N);
    const got = await unary<{ session: { contextTokens: number } }>(compute, "getSession", { sessionId: "bp" });
    expect(got.session.contextTokens).toBe(8 + N);
    await s.close();
    compute.close();
  });
});
