/**
 * Sessions across pods: two compute + kvstore pairs (real processes, each its own shared memory
 * and in-memory directory) share the session owners in Redis (FREEKV_SESSION_OWNERS, a prefix of
 * this run). A session created on pair A and continued through pair B's address: B answers
 * FAILED_PRECONDITION with A's address in the trailer x-freekv-session-owner, the client package
 * follows it, and the turns give the same greedy tokens as the same turns sent to A directly on a
 * twin session. Once A closes the session, B answers NOT_FOUND. Skipped, saying so, without Redis.
 */
import { createServer } from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Metadata, status, type ServiceError } from "@grpc/grpc-js";
import { Redis } from "ioredis";
import { FreeKvClient, SESSION_OWNER_KEY } from "../../packages/client/src/index.js";
import { GenerateRequest, type GenerateResponse } from "../../proto/gen/freekv/v1/compute.js";
import { prng } from "../helpers/prng.js";
import { QUIET, computeClient, kvstoreClient, startService, startTiers, unary, type ServiceProcess, type Tiers, redisUp } from "../helpers/services.js";

const REDIS = "redis://127.0.0.1:6379/0";
const up = await redisUp();
if (!up) console.warn("session-owners tests skipped: no Redis answers PING at 127.0.0.1:6379");

const freePort = () =>
  new Promise<number>((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const p = (srv.address() as { port: number }).port;
      srv.close(() => resolve(p));
    });
  });

describe.skipIf(!up)("session owners across two pods (Redis)", () => {
  const prefix = `freekv-test-${process.pid}-${Date.now()}:`;
  let a: Tiers, b: Tiers;
  beforeAll(async () => {
    const pair = async () => {
      const port = await freePort();
      return startTiers({
        kvstoreEnv: QUIET,
        computeEnv: { ...QUIET, FREEKV_THREADS: "1", FREEKV_OPENAI_PORT: "0", FREEKV_COMPUTE_PORT: String(port), FREEKV_SESSION_OWNERS: REDIS, FREEKV_SESSION_OWNERS_PREFIX: prefix, FREEKV_ADVERTISE_ADDRESS: `127.0.0.1:${port}` },
      });
    };
    a = await pair();
    b = await pair();
  }, 120_000);
  afterAll(async () => {
    await a?.stop();
    await b?.stop();
    const r = new Redis(REDIS);
    await r.del(`${prefix}owners`);
    r.disconnect();
  });

  it("routes a session's next turns to the pod that holds it, with the same tokens as direct calls", async () => {
    const rand = prng(Number(process.env.FREEKV_TEST_SEED ?? 777));
    const turn = (n: number) => ({ $case: "tokens" as const, value: { ids: Array.from({ length: n }, () => 3 + Math.floor(rand() * 400)) } });
    const turns = [turn(30), turn(7), turn(12)];
    const sid = `owned-${Math.floor(rand() * 1e9)}`;
    const toA = new FreeKvClient(a.compute.address);
    const toB = new FreeKvClient(b.compute.address);
    try {
      await toA.createSession({ sessionId: sid, kind: 1 });
      await toA.createSession({ sessionId: `${sid}-twin`, kind: 1 });
      // The raw status from B: FAILED_PRECONDITION naming A in the trailer.
      const stub = computeClient(b.compute.address);
      const err = await new Promise<ServiceError>((resolve) => {
        const call = stub.generate(GenerateRequest.fromPartial({ sessionId: sid, prompt: turns[0], maxTokens: 4 }), new Metadata(), { deadline: Date.now() + 10_000 });
        call.on("data", (_: GenerateResponse) => {});
        call.on("error", resolve);
      });
      stub.close();
      expect(err.code).toBe(status.FAILED_PRECONDITION);
      expect(err.metadata.get(SESSION_OWNER_KEY)).toEqual([a.compute.address]);
      // Every turn through B's address lands on A; the twin gets the same turns on A directly.
      for (const prompt of turns) {
        const viaB = await toB.generateText({ sessionId: sid, prompt, maxTokens: 8, sampling: { temperature: 0, topP: 0, topK: 0, seed: 0 } });
        const direct = await toA.generateText({ sessionId: `${sid}-twin`, prompt, maxTokens: 8, sampling: { temperature: 0, topP: 0, topK: 0, seed: 0 } });
        expect(viaB.tokenIds).toEqual(direct.tokenIds);
        expect(viaB.tokenIds.length).toBe(8);
      }
      expect(toB.addressFor(sid)).toBe(a.compute.address);
      // The OpenAI front of B says the same: 421 Misdirected Request, the owner in a header.
      const base = `http://127.0.0.1:${b.compute.openaiPort}`;
      const model = ((await (await fetch(`${base}/v1/models`)).json()) as { data: { id: string }[] }).data[0].id;
      const http = await fetch(`${base}/v1/completions`, {
        method: "POST",
        headers: { "content-type": "application/json", "x-freekv-session-id": sid },
        body: JSON.stringify({ model, prompt: "hello", max_tokens: 2 }),
      });
      expect(http.status).toBe(421);
      expect(http.headers.get(SESSION_OWNER_KEY)).toBe(a.compute.address);
      expect(((await http.json()) as { error: { code: string } }).error.code).toBe("session_elsewhere");
      // Closed on A: no owner any more, B says NOT_FOUND.
      await toA.closeSession({ sessionId: sid });
      const fresh = new FreeKvClient(b.compute.address, { maxRedirects: 2 });
      await expect(fresh.generateText({ sessionId: sid, prompt: turns[0], maxTokens: 2 })).rejects.toMatchObject({ code: status.NOT_FOUND });
      fresh.close();
      await toA.closeSession({ sessionId: `${sid}-twin` });
    } finally {
      toA.close();
      toB.close();
    }
  });

  it("redirects a CreateSession of an id another live pod holds, or one this pod moved away, and takes over the record of a pod that is gone", async () => {
    const rand = prng(Number(process.env.FREEKV_TEST_SEED ?? 4242) ^ process.pid);
    const run = `${process.pid}-${Math.floor(rand() * 1e9)}`;
    const [held, moved, orphan] = [`held-${run}`, `moved-${run}`, `orphan-${run}`];
    const r = new Redis(REDIS);
    const toA = new FreeKvClient(a.compute.address);
    const rawA = computeClient(a.compute.address);
    const rawB = computeClient(b.compute.address);
    const kvA = kvstoreClient(a.kvstore.address);
    const kvB = kvstoreClient(b.kvstore.address);
    const listed = async (kv: typeof kvA) => (await unary<{ sessionIds: string[] }>(kv, "listSessions", {})).sessionIds;
    const createError = (stub: typeof rawA, sessionId: string) =>
      new Promise<ServiceError | null>((resolve) => stub.createSession({ sessionId, kind: 1, maxContextTokens: 512 } as never, (e: ServiceError | null) => resolve(e)));
    try {
      // Held by A (live): B redirects the create to A and makes nothing.
      await toA.createSession({ sessionId: held, kind: 1, maxContextTokens: 512 });
      const turn = await toA.generateText({ sessionId: held, prompt: { $case: "tokens", value: { ids: Array.from({ length: 20 + Math.floor(rand() * 40) }, () => 3 + Math.floor(rand() * 400)) } }, maxTokens: 3 });
      let e = await createError(rawB, held);
      expect(e?.code, e?.details).toBe(status.FAILED_PRECONDITION);
      expect(e?.metadata.get(SESSION_OWNER_KEY)).toEqual([a.compute.address]);
      expect(await r.hget(`${prefix}owners`, held)).toBe(a.compute.address);
      expect(await listed(kvB)).not.toContain(held);
      // The client package follows the redirect: the session is A's, with its context.
      const viaB = new FreeKvClient(b.compute.address);
      await expect(viaB.createSession({ sessionId: held, kind: 1, maxContextTokens: 512 })).rejects.toMatchObject({ code: status.ALREADY_EXISTS });
      viaB.close();
      expect(Number((await toA.getSession({ sessionId: held })).session!.contextTokens)).toBe(turn.final.usage!.contextTokens);

      // Moved from A to B: A redirects a create of its id to B, with or without B's record.
      await toA.createSession({ sessionId: moved, kind: 1, maxContextTokens: 512 });
      await toA.moveSession({ sessionId: moved, target: b.compute.address });
      expect(await r.hget(`${prefix}owners`, moved)).toBe(b.compute.address);
      for (const record of [true, false]) {
        if (!record) await r.hdel(`${prefix}owners`, moved);
        e = await createError(rawA, moved);
        expect(e?.code, e?.details).toBe(status.FAILED_PRECONDITION);
        expect(e?.metadata.get(SESSION_OWNER_KEY)).toEqual([b.compute.address]);
        expect(await listed(kvA)).not.toContain(moved);
      }
      expect(await listed(kvB)).toContain(moved);

      // Recorded for a pod that is gone (no live key): B's create takes the record over.
      await r.hset(`${prefix}owners`, orphan, `127.0.0.1:${1 + Math.floor(rand() * 1000)}`);
      e = await createError(rawB, orphan);
      expect(e?.details).toBeUndefined();
      expect(await r.hget(`${prefix}owners`, orphan)).toBe(b.compute.address);

      await toA.closeSession({ sessionId: held });
      for (const id of [moved, orphan]) await unary(rawB, "closeSession", { sessionId: id });
    } finally {
      for (const c of [rawA, rawB, kvA, kvB]) c.close();
      toA.close();
      await r.hdel(`${prefix}owners`, held, moved, orphan);
      r.disconnect();
    }
  }, 60_000);

  it("a restarted compute releases the copies another live pod owns (moved there) and takes over those of a pod that is gone", async () => {
    const port = await freePort();
    const env = { ...QUIET, FREEKV_THREADS: "1", FREEKV_LOG_LEVEL: "info", FREEKV_COMPUTE_PORT: String(port), FREEKV_SESSION_OWNERS: REDIS, FREEKV_SESSION_OWNERS_PREFIX: prefix, FREEKV_ADVERTISE_ADDRESS: `127.0.0.1:${port}` };
    const c = await startTiers({ kvstoreEnv: QUIET, computeEnv: env });
    let again: ServiceProcess | undefined;
    const r = new Redis(REDIS);
    const kv = kvstoreClient(c.kvstore.address);
    const listed = async () => (await unary<{ sessionIds: string[] }>(kv, "listSessions", {})).sessionIds;
    try {
      const run = `${process.pid}-${Date.now()}`;
      const [stale, orphan, own] = [`stale-${run}`, `orphan-${run}`, `own-${run}`];
      const client = new FreeKvClient(c.compute.address);
      for (const id of [stale, orphan, own]) await client.createSession({ sessionId: id, kind: 1 });
      client.close();
      // Where the records stand when this compute dies: `stale` moved to A (live, heartbeating),
      // `orphan` to a pod that is gone, `own` is still this pod's.
      await r.hset(`${prefix}owners`, stale, a.compute.address);
      await r.hset(`${prefix}owners`, orphan, "127.0.0.1:1");
      expect(await r.exists(`${prefix}pod:${a.compute.address}`)).toBe(1);
      await c.compute.stop("SIGKILL");
      again = await startService("compute", { env: { ...env, FREEKV_COMPUTE_METRICS_PORT: "0", FREEKV_KVSTORE_ADDR: c.kvstore.address } });
      expect(await listed()).not.toContain(stale);
      expect(await listed()).toEqual(expect.arrayContaining([orphan, own]));
      expect(await r.hget(`${prefix}owners`, stale)).toBe(a.compute.address);
      expect(await r.hget(`${prefix}owners`, orphan)).toBe(`127.0.0.1:${port}`);
      expect(await r.hget(`${prefix}owners`, own)).toBe(`127.0.0.1:${port}`);
      expect(again.output.join("\n")).toMatch(new RegExp(`"session":"${stale}".*this stale copy is released`));
      // Calls for the stale one go to A; the others are served here.
      const raw = computeClient(again.address);
      const e = await new Promise<ServiceError>((resolve) => raw.getSession({ sessionId: stale }, (err: ServiceError | null) => resolve(err!)));
      expect(e.code).toBe(status.FAILED_PRECONDITION);
      expect(e.metadata.get(SESSION_OWNER_KEY)).toEqual([a.compute.address]);
      for (const id of [orphan, own]) await unary(raw, "closeSession", { sessionId: id });
      raw.close();
      await r.hdel(`${prefix}owners`, stale);
    } finally {
      kv.close();
      r.disconnect();
      await again?.stop();
      await c.kvstore.stop();
    }
  }, 90_000);

  it("drops the owner record of a session closed for being idle", async () => {
    const port = await freePort();
    const c = await startTiers({
      kvstoreEnv: QUIET,
      computeEnv: { ...QUIET, FREEKV_THREADS: "1", FREEKV_COMPUTE_PORT: String(port), FREEKV_SESSION_OWNERS: REDIS, FREEKV_SESSION_OWNERS_PREFIX: prefix, FREEKV_ADVERTISE_ADDRESS: `127.0.0.1:${port}`, FREEKV_SESSION_IDLE_TIMEOUT_S: "0.5" },
    });
    const r = new Redis(REDIS);
    const client = new FreeKvClient(c.compute.address);
    try {
      const sid = `idle-${process.pid}-${Date.now()}`;
      await client.createSession({ sessionId: sid, kind: 1 });
      expect(await r.hget(`${prefix}owners`, sid)).toBe(c.compute.address);
      const t0 = Date.now();
      while ((await r.hget(`${prefix}owners`, sid)) !== null) {
        if (Date.now() - t0 > 15_000) throw new Error("the owner record outlived the idle session");
        await new Promise((res) => setTimeout(res, 100));
      }
      await expect(client.getSession({ sessionId: sid })).rejects.toMatchObject({ code: status.NOT_FOUND });
    } finally {
      client.close();
      r.disconnect();
      await c.stop();
    }
  }, 60_000);
});
