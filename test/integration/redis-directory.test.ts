/**
 * The session directory in Redis (FREEKV_DIRECTORY=redis://...): records land in Redis, and a
 * kvstore restarted with persisted segments adopts them, so a compute started after it
 * re-attaches the sessions. Skipped, saying why, when nothing answers at 127.0.0.1:6379.
 */
import { randomBytes } from "node:crypto";
import { readdirSync } from "node:fs";
import { directoryTag } from "../../services/kvstore/segments.js";
import { afterAll, describe, expect, it } from "vitest";
import { Redis } from "ioredis";
import { ATTENTION, QUIET, computeClient, kvstoreClient, redisUp, shmSegments, startService, unary, unaryError, type ServiceProcess } from "../helpers/services.js";
import { status } from "@grpc/grpc-js";
import { loadAddon } from "../../native/binding.js";
import { prng } from "../helpers/prng.js";

const REDIS = "redis://127.0.0.1:6379/0";


const up = await redisUp();
if (!up) console.warn("redis-directory tests skipped: no Redis answers PING at 127.0.0.1:6379");

const G = { layers: 2, queryHeads: 4, kvHeads: 2, headDim: 16, kvDtype: 1 };
const R = { pageSize: 16, sinkTokens: 16, windowTokens: 16, selectTokens: 64 };
const procs: ServiceProcess[] = [];
const prefix = `freekv-test-${randomBytes(6).toString("hex")}:`;
/** Segments this test made persist; removed at the end whatever happened. */
const made: string[] = [];

afterAll(async () => {
  for (const p of procs.reverse()) await p.stop().catch(() => undefined);
  for (const n of made) loadAddon().ShmSegment.unlink(n);
  if (up) {
    const r = new Redis(REDIS);
    const keys = await r.keys(`${prefix}*`);
    if (keys.length) await r.del(...keys);
    await r.quit();
  }
});

describe.skipIf(!up)("Redis session directory", () => {
  it("keeps records in Redis; a restarted kvstore adopts persisted segments; compute re-attaches", async () => {
    const kvEnv = { ...QUIET, FREEKV_KVSTORE_PORT: "0", FREEKV_KVSTORE_METRICS_PORT: "0", FREEKV_DIRECTORY: REDIS, FREEKV_DIRECTORY_PREFIX: prefix, FREEKV_KVSTORE_PERSIST: "1" };
    const kv1 = await startService("kvstore", { env: kvEnv });
    procs.push(kv1);
    const c1 = await startService("compute", { env: { ...QUIET, FREEKV_COMPUTE_PORT: "0", FREEKV_COMPUTE_METRICS_PORT: "0", FREEKV_KVSTORE_ADDR: kv1.address } });
    procs.push(c1);
    let compute = computeClient(c1.address);
    await unary(compute, "createSession", { sessionId: "r-1", kind: ATTENTION, geometry: G, retrieval: R, maxContextTokens: 300 });
    await unary(compute, "createSession", { sessionId: "r-2", kind: ATTENTION, geometry: G, retrieval: R, maxContextTokens: 300 });
    const kv1c = kvstoreClient(kv1.address);
    for (const id of ["r-1", "r-2"]) {
      const a = await unary<Record<string, { name: string }>>(kv1c, "attachSession", { sessionId: id });
      made.push(a.store.name, a.staging.name, a.tail.name, a.manifest.name);
    }
    kv1c.close();
    expect(new Set(made).size).toBe(8);
    for (const n of made) expect(shmSegments().has(n)).toBe(true);

    const redis = new Redis(REDIS);
    expect((await redis.smembers(`${prefix}sessions`)).sort()).toEqual(["r-1", "r-2"]);
    const rec = JSON.parse((await redis.get(`${prefix}session:r-1`))!) as { geometry: { kvHeads: number }; segments: { store: { name: string } } };
    expect(rec.geometry.kvHeads).toBe(2);
    expect(made).toContain(rec.segments.store.name);

    // Both processes go; the segments stay (persist) and so do the records (Redis).
    compute.close();
    await c1.stop();
    await kv1.stop();
    for (const n of made) expect(shmSegments().has(n)).toBe(true);
    // What a kvstore of this directory killed between making segments and recording them (or
    // between deleting a record and unlinking them) leaves: its successor sweeps it. A dead
    // kvstore's of another directory, or named before directories were tagged, are left alone.
    const running = new Set(readdirSync("/proc").filter((d) => /^\d+$/.test(d)).map(Number));
    let dead = 410000 + (process.pid % 1000);
    while (running.has(dead)) dead++;
    const hex = () => randomBytes(16).toString("hex");
    const orphan = `/freekv-kv-${dead}-12345-p${directoryTag(REDIS, prefix)}-${hex()}`;
    const foreign = `/freekv-kv-${dead}-12345-p${directoryTag(REDIS, `${prefix}other:`)}-${hex()}`;
    const legacy = `/freekv-kv-${dead}-12345-p-${hex()}`;
    for (const n of [orphan, foreign, legacy]) {
      loadAddon().ShmSegment.create(n, 4096).close();
      made.push(n);
    }
    // This test's kvstore named its own segments with the directory's tag.
    expect(rec.segments.store.name).toMatch(new RegExp(`^/freekv-kv-\\d+-\\d+-p${directoryTag(REDIS, prefix)}-[0-9a-f]{32}$`));

    const kv2 = await startService("kvstore", { env: { ...kvEnv, FREEKV_KVSTORE_PERSIST: "0" } });
    procs.push(kv2);
    expect(shmSegments().has(orphan)).toBe(false);
    expect(shmSegments().has(foreign)).toBe(true);
    expect(shmSegments().has(legacy)).toBe(true);
    made.splice(made.indexOf(orphan), 1);
    const kv = kvstoreClient(kv2.address);
    expect((await unary<{ sessionIds: string[] }>(kv, "listSessions", {})).sessionIds).toEqual(["r-1", "r-2"]);
    const att = await unary<{ created: boolean; store: { name: string } }>(kv, "attachSession", { sessionId: "r-1" });
    expect(att.created).toBe(false);
    expect(att.store.name).toBe(rec.segments.store.name);

    const c2 = await startService("compute", { env: { ...QUIET, FREEKV_COMPUTE_PORT: "0", FREEKV_COMPUTE_METRICS_PORT: "0", FREEKV_KVSTORE_ADDR: kv2.address } });
    procs.push(c2);
    compute = computeClient(c2.address);
    const got = await unary<{ session: { sessionId: string; geometry: { headDim: number } } }>(compute, "getSession", { sessionId: "r-2" });
    expect(got.session.geometry.headDim).toBe(16);
    await unary(compute, "closeSession", { sessionId: "r-2" });
    expect(await redis.sismember(`${prefix}sessions`, "r-2")).toBe(0);
    expect((await unaryError(compute, "getSession", { sessionId: "r-2" })).code).toBe(status.NOT_FOUND);

    // Without persistence this kvstore removes the rest at shutdown, Redis records included.
    compute.close();
    kv.close();
    await c2.stop();
    expect(await kv2.stop()).toEqual({ code: 0, signal: null });
    for (const n of made.filter((x) => x !== foreign && x !== legacy)) expect(shmSegments().has(n)).toBe(false);
    expect(await redis.smembers(`${prefix}sessions`)).toEqual([]);
    await redis.quit();
  });

  it("sets unreadable records aside at start (kept under a quarantine key, counted) and adopts the others", async () => {
    const pfx = `${prefix}bad-records:`;
    const kvEnv = { ...QUIET, FREEKV_KVSTORE_PORT: "0", FREEKV_KVSTORE_METRICS_PORT: "0", FREEKV_DIRECTORY: REDIS, FREEKV_DIRECTORY_PREFIX: pfx, FREEKV_KVSTORE_PERSIST: "1" };
    const kv1 = await startService("kvstore", { env: kvEnv });
    procs.push(kv1);
    const good = `good-${randomBytes(4).toString("hex")}`;
    const c1 = kvstoreClient(kv1.address);
    const a = await unary<Record<string, { name: string }>>(c1, "attachSession", { sessionId: good, geometry: G, retrieval: R, maxContextTokens: 300 });
    made.push(a.store.name, a.staging.name, a.tail.name, a.manifest.name);
    c1.close();
    await kv1.stop();
    const redis = new Redis(REDIS);
    const valid = JSON.parse((await redis.get(`${pfx}session:${good}`))!) as Record<string, unknown>;
    const seed = Number(process.env.FREEKV_TEST_SEED) || (Date.now() ^ (process.pid << 9)) >>> 0;
    const rand = prng(seed);
    // Records no kvstore could adopt: not JSON, not an object, or a field missing or wrong.
    const kinds: Array<(id: string) => string> = [
      () => `{${Math.floor(rand() * 1e9).toString(36)}`,
      () => "null",
      () => JSON.stringify([1, 2, 3]),
      (id) => JSON.stringify({ ...valid, sessionId: id, segments: undefined }),
      (id) => JSON.stringify({ ...valid, sessionId: id, segments: { ...(valid.segments as object), tail: { sizeBytes: 4096 } } }),
      (id) => JSON.stringify({ ...valid, sessionId: id, committedPages: "7" }),
      (id) => JSON.stringify({ ...valid, sessionId: id, maxContextTokens: -1 }),
      (id) => JSON.stringify({ ...valid, sessionId: `${id}-other` }),
      (id) => JSON.stringify({ ...valid, sessionId: id, geometry: undefined }),
    ];
    // Segment names no shared-memory call takes (no leading slash, another slash, too long): such
    // a record once stopped every start, its cleanup throwing outside any handler. One is always in.
    const badNames = ["freekv-noslash", "/a/b", `/${"x".repeat(250)}`];
    const segmentKinds = ["store", "staging", "tail", "manifest"];
    const badName = (id: string) => JSON.stringify({ ...valid, sessionId: id, segments: { ...(valid.segments as object),
      [segmentKinds[Math.floor(rand() * 4)]]: { name: badNames[Math.floor(rand() * badNames.length)], sizeBytes: 4096 } } });
    const picked = [...kinds.filter(() => rand() < 0.5), badName];
    const bad = new Map<string, string>();
    for (const [i, kind] of picked.entries()) {
      const id = `bad-${i}-${randomBytes(3).toString("hex")}`;
      bad.set(id, kind(id));
      await redis.multi().set(`${pfx}session:${id}`, bad.get(id)!).sadd(`${pfx}sessions`, id).exec();
    }
    const kv2 = await startService("kvstore", { env: { ...kvEnv, FREEKV_KVSTORE_PERSIST: "0" } });
    procs.push(kv2);
    const c2 = kvstoreClient(kv2.address);
    expect((await unary<{ sessionIds: string[] }>(c2, "listSessions", {})).sessionIds, `seed ${seed}`).toEqual([good]);
    c2.close();
    expect(await redis.smembers(`${pfx}sessions`)).toEqual([good]);
    for (const [id, text] of bad) {
      expect(await redis.get(`${pfx}session:${id}`)).toBeNull();
      expect(await redis.get(`${pfx}quarantine:${id}`)).toBe(text);
    }
    const m = await (await fetch(`http://127.0.0.1:${kv2.metricsPort}/metrics`)).text();
    expect(m).toContain(`freekv_kvstore_directory_failures_total{op="decode",service="kvstore"} ${bad.size}`);
    expect(kv2.output.filter((l) => l.includes("a session directory record cannot be read")).length).toBe(bad.size);
    // Without persistence this kvstore removes the adopted session at shutdown.
    expect(await kv2.stop()).toEqual({ code: 0, signal: null });
    for (const n of [a.store.name, a.staging.name, a.tail.name, a.manifest.name]) expect(shmSegments().has(n)).toBe(false);
    await redis.quit();
  });
});
