/**
 * Overload and corruption: a kvstore over its shared-memory capacity refuses new sessions with
 * RESOURCE_EXHAUSTED (passed through compute) and keeps serving the others; a client that
 * cancels its Attention stream mid-flight leaves the session usable; a session whose manifest
 * was corrupted while compute was down is left out at re-attach while the others come back,
 * and compute keeps running.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { status } from "@grpc/grpc-js";
import { loadAddon } from "../../native/binding.js";
import { computeLayout, capacityPages, totalBytes } from "../../services/kvstore/layout.js";
import { resolveRetrieval } from "../../services/common/retrieval.js";
import { AttentionStream, f32Tensor } from "../helpers/attention-stream.js";
import { prng, randomF32 } from "../helpers/prng.js";
import { ATTENTION, QUIET, computeClient, kvstoreClient, startService, startTiers, unary, unaryError, type ServiceProcess, type Tiers } from "../helpers/services.js";

const G = { layers: 2, queryHeads: 4, kvHeads: 2, headDim: 32, kvDtype: 1 };
const R = { pageSize: 16, sinkTokens: 16, windowTokens: 32, selectTokens: 64 };
const MAX = 1024;
const perSession = totalBytes(computeLayout(G as never, resolveRetrieval(R as never, G.layers), capacityPages(MAX, R.pageSize)));
const NOMODEL = { FREEKV_MODEL: "none" };

let tiers: Tiers;
let extra: ServiceProcess | undefined;

beforeAll(async () => {
  tiers = await startTiers({
    kvstoreEnv: { ...QUIET, FREEKV_KVSTORE_CAPACITY_BYTES: String(3 * perSession + perSession / 2) },
    computeEnv: { ...QUIET, ...NOMODEL },
  });
});

afterAll(async () => {
  await extra?.stop();
  await tiers?.stop();
});

const create = (client: ReturnType<typeof computeClient>, id: string) => unary(client, "createSession", { sessionId: id, kind: ATTENTION, geometry: G, retrieval: R, maxContextTokens: MAX });

describe("overload and corruption", () => {
  it("over capacity: RESOURCE_EXHAUSTED through compute; the others keep working; room again after a close", async () => {
    const compute = computeClient(tiers.compute.address);
    for (const id of ["o-1", "o-2", "o-3"]) await create(compute, id);
    const e = await unaryError(compute, "createSession", { sessionId: "o-4", kind: ATTENTION, geometry: G, retrieval: R, maxContextTokens: MAX });
    expect(e.code).toBe(status.RESOURCE_EXHAUSTED);
    expect(e.details).toMatch(/needs \d+ bytes of shared memory/);
    expect((await unaryError(compute, "getSession", { sessionId: "o-4" })).code).toBe(status.NOT_FOUND);
    expect(((await unary(compute, "getSession", { sessionId: "o-2" })) as { session: { sessionId: string } }).session.sessionId).toBe("o-2");
    await unary(compute, "closeSession", { sessionId: "o-1" });
    await create(compute, "o-4");
    for (const id of ["o-2", "o-3", "o-4"]) await unary(compute, "closeSession", { sessionId: id });
    compute.close();
  });

  it("a client cancelling mid-stream leaves the session usable", async () => {
    const compute = computeClient(tiers.compute.address);
    await create(compute, "c-1");
    const rand = prng(5);
    const KV = G.kvHeads * G.headDim;
    const s1 = new AttentionStream(compute);
    const n = 200;
    const pending = [0, 1].map((layer) => s1.prefill("c-1", layer, f32Tensor(randomF32(n * KV, rand), [n, G.kvHeads, G.headDim]), f32Tensor(randomF32(n * KV, rand), [n, G.kvHeads, G.headDim])).catch((x: { code: number }) => x));
    s1.cancel();
    const results = await Promise.all(pending);
    for (const r of results) if ("code" in (r as object)) expect((r as { code: number }).code).toBe(status.CANCELLED);
    // Whatever the cancelled stream managed to append, the session still takes more and answers.
    const s2 = new AttentionStream(compute);
    for (let layer = 0; layer < 2; layer++) await s2.prefill("c-1", layer, f32Tensor(randomF32(8 * KV, rand), [8, G.kvHeads, G.headDim]), f32Tensor(randomF32(8 * KV, rand), [8, G.kvHeads, G.headDim]));
    const [out] = await s2.decode(0, [{ sessionId: "c-1", q: f32Tensor(randomF32(G.queryHeads * G.headDim, rand), [G.queryHeads, G.headDim]), k: f32Tensor(randomF32(KV, rand), [G.kvHeads, G.headDim]), v: f32Tensor(randomF32(KV, rand), [G.kvHeads, G.headDim]) }]);
    expect(out.shape).toEqual([G.queryHeads, G.headDim]);
    await s2.close();
    await unary(compute, "closeSession", { sessionId: "c-1" });
    compute.close();
  });

  it("a corrupted manifest: that session is left out at re-attach, the others come back", async () => {
    let compute = computeClient(tiers.compute.address);
    await create(compute, "m-good");
    await create(compute, "m-bad");
    compute.close();
    await tiers.compute.stop("SIGKILL");
    const kv = kvstoreClient(tiers.kvstore.address);
    const att = await unary<Record<string, { name: string }>>(kv, "attachSession", { sessionId: "m-bad" });
    const m = loadAddon().ShmSegment.open(att.manifest.name);
    new DataView(m.buffer()).setUint32(0, 0xdeadbeef, true);
    m.close();
    extra = await startService("compute", { env: { ...QUIET, ...NOMODEL, FREEKV_COMPUTE_PORT: "0", FREEKV_COMPUTE_METRICS_PORT: "0", FREEKV_KVSTORE_ADDR: tiers.kvstore.address } });
    compute = computeClient(extra.address);
    expect(((await unary(compute, "getSession", { sessionId: "m-good" })) as { session: { sessionId: string } }).session.sessionId).toBe("m-good");
    expect((await unaryError(compute, "getSession", { sessionId: "m-bad" })).code).toBe(status.NOT_FOUND);
    expect(extra.output.join("\n")).toMatch(/cannot re-attach session.*bad magic|bad magic.*cannot re-attach/);
    // The kvstore still holds it, so an operator can inspect or release it.
    expect((await unary<{ sessionIds: string[] }>(kv, "listSessions", {})).sessionIds).toContain("m-bad");
    expect(((await unary(kv, "releaseSession", { sessionId: "m-bad" })) as { released: boolean }).released).toBe(true);
    await unary(compute, "closeSession", { sessionId: "m-good" });
    compute.close();
    kv.close();
  });
});
