/**
 * FREEKV_MAX_SESSIONS_PER_TENANT holds for sessions that arrive by a move, across two compute +
 * kvstore pairs (real processes): a tenant's sessions moved one by one from A to B fill B's quota
 * like creates would, the next move is refused RESOURCE_EXHAUSTED before anything is imported and
 * the session stays on A, whole; another tenant's move still goes through. A draining pod's
 * hand-off is exempt: A stopped with FREEKV_DRAIN_HANDOFF naming B hands that session to B
 * anyway (a drain must not leave sessions behind for a quota).
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { credentials, Metadata, status, type Client, type ServiceError } from "@grpc/grpc-js";
import { CreateSessionRequest, MoveSessionRequest, SessionMoveServiceClient } from "../../proto/gen/freekv/v1/compute.js";
import { prng } from "../helpers/prng.js";
import { QUIET, computeClient, startTiers, unary, type Tiers, kvstoreSessions } from "../helpers/services.js";

const seed = Number(process.env.FREEKV_TEST_SEED) || (Date.now() ^ (process.pid << 9)) >>> 0;
const rand = prng(seed);
const QUOTA = 1 + Math.floor(rand() * 3);
const RETRIEVAL = { pageSize: 16, sinkTokens: 16, windowTokens: 32, selectTokens: 32, tau: 0.9, tauSet: true };

let a: Tiers;
let b: Tiers;

beforeAll(async () => {
  const env = { ...QUIET, FREEKV_THREADS: "1", FREEKV_MAX_SESSIONS_PER_TENANT: String(QUOTA) };
  b = await startTiers({ kvstoreEnv: QUIET, computeEnv: env });
  a = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...env, FREEKV_DRAIN_HANDOFF: b.compute.address, FREEKV_LOG_LEVEL: "info" } });
}, 120_000);

afterAll(async () => {
  await a?.stop().catch(() => undefined);
  await b?.stop();
});

/** A unary call with the tenant header (x-freekv-tenant); resolves with its error, or null. */
function call(client: Client, method: string, req: object, tenant?: string): Promise<ServiceError | null> {
  const md = new Metadata();
  if (tenant) md.set("x-freekv-tenant", tenant);
  return new Promise((resolve) => (client as unknown as Record<string, (...x: unknown[]) => void>)[method].call(client, req, md, { deadline: Date.now() + 20_000 }, (e: ServiceError | null) => resolve(e)));
}

const kvSessions = (t: Tiers): Promise<string[]> => kvstoreSessions(t.kvstore.address);

describe(`the per-tenant session quota and moves (seed ${seed}, quota ${QUOTA})`, () => {
  it("refuses a move past the target's quota (the session stays whole at the source); a drain's hand-off is exempt", async () => {
    const toA = computeClient(a.compute.address);
    const toB = computeClient(b.compute.address);
    const mover = new SessionMoveServiceClient(a.compute.address, credentials.createInsecure());
    const tenant = `t-${Math.floor(rand() * 1e9).toString(36)}`;
    const other = `${tenant}-other`;
    const id = (i: number | string) => `q-${tenant}-${i}`;
    const create = (sid: string, t: string) => call(toA, "createSession", CreateSessionRequest.fromPartial({ sessionId: sid, kind: 1, retrieval: RETRIEVAL, maxContextTokens: 512 }), t);
    const move = (sid: string) => call(mover, "moveSession", MoveSessionRequest.fromPartial({ sessionId: sid, target: b.compute.address }));
    try {
      // Each session is created on A (within A's quota: the move frees its slot) and moved to B.
      for (let i = 0; i < QUOTA; i++) {
        expect(await create(id(i), tenant)).toBeNull();
        const e = await move(id(i));
        expect(e?.details).toBeUndefined();
      }
      // B holds the tenant's quota now: the next one stays on A, and nothing of it reached B.
      const extra = id("extra");
      expect(await create(extra, tenant)).toBeNull();
      const refused = await move(extra);
      expect(refused?.code, refused?.details).toBe(status.RESOURCE_EXHAUSTED);
      expect(refused?.details).toContain("FREEKV_MAX_SESSIONS_PER_TENANT");
      expect(await kvSessions(a)).toContain(extra);
      expect(await kvSessions(b)).not.toContain(extra);
      expect(await call(toA, "getSession", { sessionId: extra })).toBeNull();
      // The quota is per tenant: another tenant's session still moves to B.
      expect(await create(id("other"), other)).toBeNull();
      expect((await move(id("other")))?.details).toBeUndefined();
      // A drains and hands the refused session to B after all (the log says what moved).
      expect(await a.compute.stop("SIGTERM")).toEqual({ code: 0, signal: null });
      const out = a.compute.output.join("\n");
      expect(out).toMatch(/"moved":1,"failed":0.*"hand-off done"/);
      expect(await kvSessions(b)).toContain(extra);
      for (let i = 0; i < QUOTA; i++) expect(await call(toB, "closeSession", { sessionId: id(i) })).toBeNull();
      for (const sid of [extra, id("other")]) expect(await call(toB, "closeSession", { sessionId: sid })).toBeNull();
    } finally {
      toA.close();
      toB.close();
      mover.close();
    }
  }, 90_000);
});
