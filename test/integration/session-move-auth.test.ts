/**
 * Moves with tenant tokens (FREEKV_AUTH_TOKENS_FILE on both pods; no session-owners directory, so
 * the source's own record of where a session went answers the redirects). A move without a token
 * is UNAUTHENTICATED, another tenant's is PERMISSION_DENIED, and neither touches the session; the
 * session's tenant moves it (its token is passed on to the target, which keeps the session to
 * that tenant), FREEKV_MOVE_ADMIN_TENANT moves any tenant's, and a draining pod hands a session off
 * with its own token (FREEKV_PEER_TOKEN_FILE).
 */
import { createHash, randomBytes } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Metadata, status } from "@grpc/grpc-js";
import { FreeKvClient } from "../../packages/client/src/index.js";
import { prng } from "../helpers/prng.js";
import { QUIET, startTiers, unary, type Tiers, kvstoreSessions } from "../helpers/services.js";

const dir = mkdtempSync(join(tmpdir(), "freekv-move-auth-"));
const token = (t: string) => `${t}-${randomBytes(18).toString("hex")}`;
const tokens = { alpha: token("alpha"), beta: token("beta"), ops: token("ops") };
const file = join(dir, "tokens.json");
writeFileSync(file, JSON.stringify(Object.fromEntries(Object.entries(tokens).map(([t, k]) => [t, createHash("sha256").update(k).digest("hex")]))));
const peerTokenFile = join(dir, "peer-token");
writeFileSync(peerTokenFile, `${tokens.ops}\n`);
const as = (k: string) => {
  const md = new Metadata();
  md.set("authorization", `Bearer ${k}`);
  return { metadata: md };
};
const freePort = () =>
  new Promise<number>((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const p = (srv.address() as { port: number }).port;
      srv.close(() => resolve(p));
    });
  });

const kvSessions = (t: Tiers): Promise<string[]> => kvstoreSessions(t.kvstore.address);

describe("session moves with tenant tokens", () => {
  const rand = prng(Number(process.env.FREEKV_TEST_SEED ?? 5150));
  const prompt = (n: number) => ({ $case: "tokens" as const, value: { ids: Array.from({ length: n }, () => 3 + Math.floor(rand() * 400)) } });
  let a: Tiers, b: Tiers;
  beforeAll(async () => {
    const [pa, pb] = [await freePort(), await freePort()];
    const env = (port: number) => ({ ...QUIET, FREEKV_THREADS: "1", FREEKV_COMPUTE_PORT: String(port), FREEKV_ADVERTISE_ADDRESS: `127.0.0.1:${port}`, FREEKV_AUTH_TOKENS_FILE: file, FREEKV_MOVE_ADMIN_TENANT: "ops" });
    b = await startTiers({ kvstoreEnv: QUIET, computeEnv: env(pb) });
    a = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...env(pa), FREEKV_DRAIN_HANDOFF: b.compute.address, FREEKV_PEER_TOKEN_FILE: peerTokenFile } });
  }, 180_000);
  afterAll(async () => {
    await a?.stop();
    await b?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it("lets a session's tenant and the admin tenant move it, nobody else; the target keeps it to its tenant; a drain hands off with the pod's token", async () => {
    const client = new FreeKvClient(a.compute.address, { retry: { maxAttempts: 1 } });
    const sid = `alpha-${randomBytes(4).toString("hex")}`;
    const sid2 = `alpha2-${randomBytes(4).toString("hex")}`;
    try {
      for (const id of [sid, sid2]) {
        await client.createSession({ sessionId: id, kind: 1 }, as(tokens.alpha));
        await client.generateText({ sessionId: id, prompt: prompt(40), maxTokens: 3 }, as(tokens.alpha));
      }
      await expect(client.moveSession({ sessionId: sid, target: b.compute.address })).rejects.toMatchObject({ code: status.UNAUTHENTICATED });
      await expect(client.moveSession({ sessionId: sid, target: b.compute.address }, as(`${tokens.alpha}x`))).rejects.toMatchObject({ code: status.UNAUTHENTICATED });
      await expect(client.moveSession({ sessionId: sid, target: b.compute.address }, as(tokens.beta))).rejects.toMatchObject({ code: status.PERMISSION_DENIED });
      expect(await kvSessions(a)).toContain(sid);
      expect(await kvSessions(b)).not.toContain(sid);

      const moved = await client.moveSession({ sessionId: sid, target: b.compute.address }, as(tokens.alpha));
      expect(moved.target).toBe(b.compute.address);
      expect(await kvSessions(b)).toContain(sid);
      // On B the session is still alpha's only; alpha continues it there (the client follows).
      const toB = new FreeKvClient(b.compute.address, { retry: { maxAttempts: 1 } });
      await expect(toB.getSession({ sessionId: sid }, as(tokens.beta))).rejects.toMatchObject({ code: status.PERMISSION_DENIED });
      toB.close();
      const got = await client.getSession({ sessionId: sid }, as(tokens.alpha));
      expect(Number(got.session!.contextTokens)).toBeGreaterThan(40);
      const t = await client.generateText({ sessionId: sid, prompt: prompt(5), maxTokens: 3 }, as(tokens.alpha));
      expect(t.tokenIds.length).toBe(3);

      // The admin tenant moves alpha's session back.
      await client.moveSession({ sessionId: sid, target: a.compute.address }, as(tokens.ops));
      expect(await kvSessions(a)).toContain(sid);
      expect(await kvSessions(b)).not.toContain(sid);

      // A drains: both sessions go to B with A's peer token.
      await a.compute.stop("SIGTERM");
      expect(a.compute.output.filter((l) => l.includes("session not handed off"))).toEqual([]);
      const onB = await kvSessions(b);
      expect(onB).toContain(sid);
      expect(onB).toContain(sid2);
      const back = new FreeKvClient(b.compute.address, { retry: { maxAttempts: 1 } });
      const t2 = await back.generateText({ sessionId: sid2, prompt: prompt(5), maxTokens: 3 }, as(tokens.alpha));
      expect(t2.tokenIds.length).toBe(3);
      await expect(back.generateText({ sessionId: sid2, prompt: prompt(5), maxTokens: 3 }, as(tokens.beta))).rejects.toMatchObject({ code: status.PERMISSION_DENIED });
      back.close();
    } finally {
      client.close();
    }
  }, 180_000);
});
