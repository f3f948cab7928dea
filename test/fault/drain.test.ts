/**
 * SIGTERM drains: health turns NOT_SERVING, calls in flight finish (or, past the grace period,
 * end UNAVAILABLE), new calls are refused, the process exits 0, and the kvstore
 * removes the segments it made (unless told to keep them).
 */
import { afterEach, describe, expect, it } from "vitest";
import { status } from "@grpc/grpc-js";
import { loadAddon } from "../../native/binding.js";
import { AttentionStream } from "../helpers/attention-stream.js";
import { healthWatch } from "../helpers/grpc-probes.js";
import { ATTENTION, QUIET, computeClient, kvstoreClient, shmSegments, startTiers, unary, unaryError, type Tiers } from "../helpers/services.js";

const G = { layers: 2, queryHeads: 4, kvHeads: 2, headDim: 16, kvDtype: 1 };
const R = { pageSize: 16, sinkTokens: 16, windowTokens: 16, selectTokens: 64 };
let tiers: Tiers | undefined;

/** The segment names the kvstore holds for these sessions (a re-attach returns them). */
async function segmentsOf(address: string, ids: string[]): Promise<string[]> {
  const kv = kvstoreClient(address);
  const names: string[] = [];
  for (const id of ids) {
    const a = await unary<Record<string, { name: string }>>(kv, "attachSession", { sessionId: id });
    names.push(a.store.name, a.staging.name, a.tail.name, a.manifest.name);
  }
  kv.close();
  return names;
}

/** Segments a test made persist; removed after it whatever happened. */
const kept: string[] = [];

afterEach(async () => {
  await tiers?.stop("SIGTERM").catch(() => undefined);
  tiers = undefined;
  for (const n of kept.splice(0)) loadAddon().ShmSegment.unlink(n);
});

describe("SIGTERM", () => {
  it("compute: NOT_SERVING, an idle stream is cancelled after the grace period, a unary call in flight completes, exit 0", async () => {
    tiers = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...QUIET, FREEKV_SHUTDOWN_GRACE_MS: "1500" } });
    const compute = computeClient(tiers.compute.address);
    await unary(compute, "createSession", { sessionId: "drain-1", kind: ATTENTION, geometry: G, retrieval: R, maxContextTokens: 256 });
    const watch = healthWatch(tiers.compute.address);
    await watch.waitFor("SERVING");
    // An open stream that never finishes by itself.
    const stream = new AttentionStream(compute);
    await new Promise((r) => setTimeout(r, 100));
    // A unary call issued right before the signal.
    const inflight = unary<{ session: { sessionId: string } }>(compute, "createSession", { sessionId: "drain-2", kind: ATTENTION, geometry: G, retrieval: R, maxContextTokens: 256 });
    await new Promise((r) => setTimeout(r, 5));
    const t0 = Date.now();
    tiers.compute.child.kill("SIGTERM");
    await watch.waitFor("NOT_SERVING");
    expect((await inflight).session.sessionId).toBe("drain-2");
    const exit = await tiers.compute.exited;
    const waited = Date.now() - t0;
    expect(exit).toEqual({ code: 0, signal: null });
    const err = await stream.ended;
    // UNAVAILABLE (retried elsewhere by clients), not the CANCELLED of a reset stream.
    expect(err?.code).toBe(status.UNAVAILABLE);
    expect(waited).toBeGreaterThanOrEqual(1400); // the stream held the drain for the grace period
    expect(waited).toBeLessThan(15000);
    watch.cancel();
    // New calls are refused once it is gone.
    const late = await unaryError(compute, "getSession", { sessionId: "drain-1" });
    expect(late.code).toBe(status.UNAVAILABLE);
    compute.close();
    // The kvstore still holds both sessions (a restarted compute re-attaches them).
    const kv = kvstoreClient(tiers.kvstore.address);
    expect((await unary<{ sessionIds: string[] }>(kv, "listSessions", {})).sessionIds).toEqual(["drain-1", "drain-2"]);
    kv.close();
  });

  it("kvstore: exits 0 and removes every segment it made", async () => {
    tiers = await startTiers({ kvstoreEnv: QUIET, computeEnv: QUIET });
    const compute = computeClient(tiers.compute.address);
    for (const id of ["k1", "k2", "k3"]) await unary(compute, "createSession", { sessionId: id, kind: ATTENTION, geometry: G, retrieval: R, maxContextTokens: 512 });
    const made = await segmentsOf(tiers.kvstore.address, ["k1", "k2", "k3"]);
    expect(made.length).toBe(12);
    for (const n of made) expect(shmSegments().has(n)).toBe(true);
    compute.close();
    expect(await tiers.compute.stop("SIGTERM")).toEqual({ code: 0, signal: null });
    expect(await tiers.kvstore.stop("SIGTERM")).toEqual({ code: 0, signal: null });
    const after = shmSegments();
    for (const n of made) expect(after.has(n)).toBe(false);
  });

  it("kvstore with FREEKV_KVSTORE_PERSIST=1 keeps the segments of live sessions", async () => {
    tiers = await startTiers({ kvstoreEnv: { ...QUIET, FREEKV_KVSTORE_PERSIST: "1" }, computeEnv: QUIET });
    const compute = computeClient(tiers.compute.address);
    await unary(compute, "createSession", { sessionId: "p1", kind: ATTENTION, geometry: G, retrieval: R, maxContextTokens: 512 });
    const made = await segmentsOf(tiers.kvstore.address, ["p1"]);
    kept.push(...made);
    expect(made.length).toBe(4);
    compute.close();
    await tiers.compute.stop();
    expect(await tiers.kvstore.stop()).toEqual({ code: 0, signal: null });
    const after = shmSegments();
    for (const n of made) expect(after.has(n)).toBe(true);
  });
});

describe("compute follows the kvstore's health", () => {
  it("turns NOT_SERVING when its kvstore stops, and the kvstore's drain is not held by compute's watch", async () => {
    tiers = await startTiers({ kvstoreEnv: { ...QUIET, FREEKV_SHUTDOWN_GRACE_MS: "10000" }, computeEnv: QUIET });
    const watch = healthWatch(tiers.compute.address, "freekv.v1.ComputeService");
    await watch.waitFor("SERVING");
    const t0 = Date.now();
    expect(await tiers.kvstore.stop("SIGTERM")).toEqual({ code: 0, signal: null });
    expect(Date.now() - t0).toBeLessThan(8000);
    await watch.waitFor("NOT_SERVING");
    const compute = computeClient(tiers.compute.address);
    const e = await unaryError(compute, "createSession", { sessionId: "orphan", kind: ATTENTION, geometry: G, retrieval: R, maxContextTokens: 256 });
    expect(e.code).toBe(status.UNAVAILABLE);
    compute.close();
    watch.cancel();
  });
});
