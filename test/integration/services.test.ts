/**
 * Both tiers as real processes on ephemeral ports: health, reflection, metrics, a session that
 * crosses compute -> kvstore, a segment written in one process and verified in another, and
 * clear errors for bad requests.
 */
import { totalmem } from "node:os";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { status } from "@grpc/grpc-js";
import { loadAddon } from "../../native/binding.js";
import { crc32c } from "../../services/common/crc32c.js";
import { AttentionStream } from "../helpers/attention-stream.js";
import { healthCheck, healthWatch, reflectionHasSymbol, reflectionServices } from "../helpers/grpc-probes.js";
import { prng, randomBytes } from "../helpers/prng.js";
import { ATTENTION, QUIET, computeClient, fetchMetrics, kvstoreClient, metricValue, shmSegments, startTiers, unary, unaryError, type Tiers } from "../helpers/services.js";

let tiers: Tiers;
let compute: ReturnType<typeof computeClient>;
let kv: ReturnType<typeof kvstoreClient>;

const geometry = { layers: 3, queryHeads: 8, kvHeads: 2, headDim: 32, kvDtype: 1 };
const retrieval = { pageSize: 16, sinkTokens: 32, windowTokens: 32, selectTokens: 64 };

beforeAll(async () => {
  // No model served here (attention sessions only), so model sessions have nothing to run.
  tiers = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...QUIET, FREEKV_MODEL: "none" } });
  compute = computeClient(tiers.compute.address);
  kv = kvstoreClient(tiers.kvstore.address);
});

afterAll(async () => {
  compute?.close();
  kv?.close();
  await tiers?.stop();
});

describe("both services", () => {
  it("report SERVING over grpc.health.v1 Check, for the server and for their service", async () => {
    expect(await healthCheck(tiers.compute.address)).toBe("SERVING");
    expect(await healthCheck(tiers.compute.address, "freekv.v1.ComputeService")).toBe("SERVING");
    expect(await healthCheck(tiers.kvstore.address)).toBe("SERVING");
    expect(await healthCheck(tiers.kvstore.address, "freekv.v1.KvStoreService")).toBe("SERVING");
    await expect(healthCheck(tiers.kvstore.address, "no.such.Service")).rejects.toMatchObject({ code: status.NOT_FOUND });
  });

  it("stream SERVING over Health/Watch", async () => {
    const w = healthWatch(tiers.compute.address);
    await w.waitFor("SERVING");
    w.cancel();
  });

  it("list their services through grpc.reflection.v1 and resolve their symbols", async () => {
    const c = await reflectionServices(tiers.compute.address);
    expect(c).toContain("freekv.v1.ComputeService");
    expect(c).toContain("grpc.health.v1.Health");
    expect(c).toContain("freekv.v1.SessionMoveService");
    expect(c).not.toContain("freekv.v1.KvStoreService");
    expect(c).not.toContain("freekv.v1.KvStoreTransferService");
    const k = await reflectionServices(tiers.kvstore.address);
    expect(k).toContain("freekv.v1.KvStoreService");
    expect(k).toContain("freekv.v1.KvStoreTransferService");
    expect(k).not.toContain("freekv.v1.ComputeService");
    expect(await reflectionHasSymbol(tiers.compute.address, "freekv.v1.AttentionRequest")).toBe(true);
    expect(await reflectionHasSymbol(tiers.kvstore.address, "freekv.v1.SegmentLayout")).toBe(true);
  });

  it("serve Prometheus /metrics on their own ports", async () => {
    const c = await fetchMetrics(tiers.compute.metricsPort);
    expect(c).toContain("freekv_compute_sessions");
    expect(c).toContain("freekv_process_cpu_seconds_total");
    const k = await fetchMetrics(tiers.kvstore.metricsPort);
    expect(k).toContain("freekv_kvstore_segment_bytes");
    expect(k).toContain('service="kvstore"');
  });
});

describe("a session crosses compute -> kvstore", () => {
  it("CreateSession makes the kvstore create four 0600 segments; CloseSession removes them", async () => {
    const statsBefore = await unary<{ sessions: number; segmentBytes: number }>(kv, "getStats", {});
    const res = await unary<{ session: { sessionId: string; geometry: typeof geometry; retrieval: Record<string, number>; maxContextTokens: number } }>(compute, "createSession", {
      sessionId: "cross-1",
      kind: ATTENTION,
      geometry,
      retrieval,
      maxContextTokens: 1000,
    });
    expect(res.session.sessionId).toBe("cross-1");
    expect(res.session.retrieval.pageSize).toBe(16);
    expect(res.session.retrieval.tau).toBeCloseTo(0.9, 6); // the default

    const stats = await unary<{ sessions: number; segmentBytes: number }>(kv, "getStats", {});
    expect(stats.sessions).toBe(statsBefore.sessions + 1);
    const list = await unary<{ sessionIds: string[] }>(kv, "listSessions", {});
    expect(list.sessionIds).toContain("cross-1");

    // Re-attaching at the kvstore returns the same segments, created = false.
    const att = await unary<Record<string, any>>(kv, "attachSession", { sessionId: "cross-1" });
    expect(att.created).toBe(false);
    const names = [att.store.name, att.staging.name, att.tail.name, att.manifest.name] as string[];
    const present = shmSegments();
    for (const n of names) expect(present.has(n)).toBe(true);
    expect(new Set(names).size).toBe(4);
    for (const n of names) expect(n).toMatch(new RegExp(`^/freekv-kv-${tiers.kvstore.pid}-\\d+-m-[0-9a-f]{32}$`));
    const { statSync } = await import("node:fs");
    for (const n of names) expect(statSync(`/dev/shm${n}`).mode & 0o777).toBe(0o600);
    // Sizes follow the layout: capacity = ceil(1000 / 16) = 63 pages, page = 2 heads * 2 * 16 * 32 * 4 bytes.
    const pageBytes = geometry.kvHeads * 2 * retrieval.pageSize * geometry.headDim * 4;
    expect(att.layout.pageBytes).toBe(pageBytes);
    expect(att.layout.capacityPages).toBe(Math.ceil(1000 / 16));
    expect(att.store.sizeBytes).toBeGreaterThanOrEqual(pageBytes * 63 * geometry.layers);
    expect(stats.segmentBytes - statsBefore.segmentBytes).toBe([att.store, att.staging, att.tail, att.manifest].reduce((a: number, s: any) => a + s.sizeBytes, 0));

    // The manifest header written by the kvstore, read here through the addon.
    const { ShmSegment } = loadAddon();
    const m = ShmSegment.open(att.manifest.name);
    const dv = new DataView(m.buffer());
    expect(dv.getUint32(0, true)).toBe(0x31564b46);
    expect(dv.getUint32(4, true)).toBe(geometry.layers);
    m.close();

    const got = await unary<{ session: { sessionId: string; contextTokens: number } }>(compute, "getSession", { sessionId: "cross-1" });
    expect(got.session.sessionId).toBe("cross-1");
    const closed = await unary<{ closed: boolean }>(compute, "closeSession", { sessionId: "cross-1" });
    expect(closed.closed).toBe(true);
    for (const n of names) expect(shmSegments().has(n)).toBe(false);
    expect((await unary<{ sessions: number }>(kv, "getStats", {})).sessions).toBe(statsBefore.sessions);
    expect((await unaryError(compute, "getSession", { sessionId: "cross-1" })).code).toBe(status.NOT_FOUND);
  });

  it("pages written into the store segment by this process are verified by the kvstore process (CRC32C)", async () => {
    await unary(compute, "createSession", { sessionId: "cross-2", kind: ATTENTION, geometry, retrieval, maxContextTokens: 512 });
    const att = await unary<Record<string, any>>(kv, "attachSession", { sessionId: "cross-2" });
    const { ShmSegment } = loadAddon();
    const store = ShmSegment.open(att.store.name);
    const bytes = new Uint8Array(store.buffer());
    const rand = prng(0x5eed01);
    const layer = 1;
    const pageBytes = att.layout.pageBytes as number;
    const checksums: number[] = [];
    for (let p = 0; p < 3; p++) {
      const page = randomBytes(pageBytes, rand);
      bytes.set(page, layer * att.layout.layerStrideBytes + p * pageBytes);
      checksums.push(crc32c(page));
    }
    const ok = await unary<{ committedPages: number }>(kv, "commitPages", { sessionId: "cross-2", layer, firstPage: 0, count: 3, contextTokens: 3 * 16 + 5, checksums });
    expect(ok.committedPages).toBe(3);
    // One flipped byte in page 4, committed with the checksum of the intended bytes: refused.
    const page4 = randomBytes(pageBytes, rand);
    const off4 = layer * att.layout.layerStrideBytes + 3 * pageBytes;
    bytes.set(page4, off4);
    bytes[off4 + 100] ^= 0x40;
    const bad = await unaryError(kv, "commitPages", { sessionId: "cross-2", layer, firstPage: 3, count: 1, contextTokens: 4 * 16, checksums: [crc32c(page4)] });
    expect(bad.code).toBe(status.FAILED_PRECONDITION);
    expect(bad.details).toContain("checksums[0]");
    store.close();
    const again = await unary<Record<string, any>>(kv, "attachSession", { sessionId: "cross-2" });
    expect(again.committedPages).toEqual([0, 3, 0]);
    const st = await unary<{ committedPages: number }>(kv, "getStats", {});
    expect(st.committedPages).toBeGreaterThanOrEqual(3);
    expect(metricValue(await fetchMetrics(tiers.kvstore.metricsPort), "freekv_kvstore_checksum_failures_total")).toBe(1);
    await unary(compute, "closeSession", { sessionId: "cross-2" });
  });
});

describe("bad requests get INVALID_ARGUMENT naming the field", () => {
  const cases: Array<[string, Record<string, unknown>, string]> = [
    ["kv_heads not dividing query_heads", { kind: ATTENTION, geometry: { ...geometry, kvHeads: 3 } }, "geometry.kv_heads"],
    ["zero layers", { kind: ATTENTION, geometry: { ...geometry, layers: 0 } }, "geometry.layers"],
    ["missing geometry", { kind: ATTENTION }, "geometry"],
    ["sink not a multiple of the page", { kind: ATTENTION, geometry, retrieval: { ...retrieval, sinkTokens: 40 } }, "retrieval.sink_tokens"],
    ["dense layer out of range", { kind: ATTENTION, geometry, retrieval: { ...retrieval, denseLayers: [7] } }, "retrieval.dense_layers[0]"],
    ["bad session id", { sessionId: "no spaces/please", kind: ATTENTION, geometry }, "session_id"],
    ["unknown mode", { kind: ATTENTION, geometry, retrieval: { ...retrieval, mode: 42 } }, "retrieval.mode"],
  ];
  for (const [name, req, field] of cases) {
    it(name, async () => {
      const e = await unaryError(compute, "createSession", req);
      expect(e.code).toBe(status.INVALID_ARGUMENT);
      expect(e.details.startsWith(`${field}:`)).toBe(true);
    });
  }

  it("model sessions without a model are FAILED_PRECONDITION; duplicates ALREADY_EXISTS; unknown ids NOT_FOUND", async () => {
    expect((await unaryError(compute, "createSession", {})).code).toBe(status.FAILED_PRECONDITION);
    await unary(compute, "createSession", { sessionId: "dup", kind: ATTENTION, geometry, retrieval, maxContextTokens: 256 });
    expect((await unaryError(compute, "createSession", { sessionId: "dup", kind: ATTENTION, geometry })).code).toBe(status.ALREADY_EXISTS);
    await unary(compute, "closeSession", { sessionId: "dup" });
    expect((await unaryError(compute, "closeSession", { sessionId: "dup" })).code).toBe(status.NOT_FOUND);
    expect((await unaryError(compute, "getSession", { sessionId: "" })).details).toMatch(/^session_id:/);
  });

  it("a session whose engine working memory passes half the machine's is RESOURCE_EXHAUSTED, with nothing left at the kvstore", async () => {
    // 64 layers x 32 KV heads x 256 x K and V in float32: 4 MiB a slot token; enough tokens of
    // sink + window + selection to pass half of this machine's memory.
    const big = { layers: 64, queryHeads: 32, kvHeads: 32, headDim: 256, kvDtype: 1 };
    const perToken = 64 * 32 * 256 * 2 * 4;
    const select = Math.ceil(totalmem() / 2 / perToken / 16) * 16;
    const before = (await unary<{ sessionIds: string[] }>(kv, "listSessions", {})).sessionIds.length;
    const e = await unaryError(compute, "createSession", { sessionId: "huge", kind: ATTENTION, geometry: big, retrieval: { ...retrieval, selectTokens: select }, maxContextTokens: 2 * select });
    expect(e.code).toBe(status.RESOURCE_EXHAUSTED);
    expect(e.details).toMatch(/needs \d+ bytes of engine memory .* at most half of this machine's/);
    expect((await unary<{ sessionIds: string[] }>(kv, "listSessions", {})).sessionIds.length).toBe(before);
  });

  it("the kvstore refuses commits that leave gaps or exceed the capacity", async () => {
    await unary(compute, "createSession", { sessionId: "commits", kind: ATTENTION, geometry, retrieval, maxContextTokens: 64 });
    const gap = await unaryError(kv, "commitPages", { sessionId: "commits", layer: 0, firstPage: 2, count: 1, contextTokens: 48 });
    expect(gap.code).toBe(status.FAILED_PRECONDITION);
    const over = await unaryError(kv, "commitPages", { sessionId: "commits", layer: 0, firstPage: 0, count: 5, contextTokens: 64 });
    expect(over.code).toBe(status.INVALID_ARGUMENT);
    expect(over.details).toMatch(/^count:/);
    const layer = await unaryError(kv, "commitPages", { sessionId: "commits", layer: 3, firstPage: 0, count: 1, contextTokens: 16 });
    expect(layer.details).toMatch(/^layer:/);
    expect((await unaryError(kv, "commitPages", { sessionId: "nope", layer: 0, firstPage: 0, count: 1, contextTokens: 16 })).code).toBe(status.NOT_FOUND);
    // Several layers in one call: a bad entry names itself and nothing is applied; then all apply.
    const multi = await unaryError(kv, "commitPages", { sessionId: "commits", contextTokens: 32, layers: [{ layer: 0, firstPage: 0, count: 1 }, { layer: 1, firstPage: 0, count: 9 }] });
    expect(multi.code).toBe(status.INVALID_ARGUMENT);
    expect(multi.details).toMatch(/^layers\[1\]\.count:/);
    const both = await unary(kv, "commitPages", { sessionId: "commits", contextTokens: 32, layers: [{ layer: 1, firstPage: 0, count: 2 }, { layer: 0, firstPage: 0, count: 1 }] });
    expect(both).toMatchObject({ committedPages: 1, layerCommittedPages: [2, 1] });
    await unary(compute, "closeSession", { sessionId: "commits" });
  });
});

describe("deadlines", () => {
  it("an Attention stream past its deadline ends DEADLINE_EXCEEDED and the server keeps serving", async () => {
    const t0 = Date.now();
    const s = new AttentionStream(compute, 300);
    const err = await s.ended;
    expect(err?.code).toBe(status.DEADLINE_EXCEEDED);
    expect(Date.now() - t0).toBeLessThan(5000);
    expect(await healthCheck(tiers.compute.address)).toBe("SERVING");
  });
});
