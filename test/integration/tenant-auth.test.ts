/**
 * Per-tenant bearer tokens (FREEKV_AUTH_TOKENS_FILE), real processes, built-in model: a call
 * without a token or with an unknown one is UNAUTHENTICATED and creates nothing; a session made
 * by tenant A answers A and is PERMISSION_DENIED to tenant B (Generate, GetSession, CloseSession);
 * the OpenAI front takes the same token in its Authorization header (401 without), the Attention
 * stream the same metadata (an attention session is its tenant's only); a tokens file
 * that is not valid stops compute at start with the reason.
 */
import { createHash, randomBytes } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Metadata, status, type ServiceError } from "@grpc/grpc-js";
import { FreeKvClient } from "../../packages/client/src/index.js";
import { QUIET, computeClient, fetchMetrics, metricValue, startService, startTiers, type Tiers } from "../helpers/services.js";
import { AttentionRequest, type AttentionResponse } from "../../proto/gen/freekv/v1/compute.js";
import { writeTensor } from "../../services/compute/attention/tensor.js";

const dir = mkdtempSync(join(tmpdir(), "freekv-auth-"));
const token = (t: string) => `${t}-${randomBytes(18).toString("hex")}`;
const tokens = { alpha: token("alpha"), beta: token("beta") };
const file = join(dir, "tokens.json");
writeFileSync(file, JSON.stringify(Object.fromEntries(Object.entries(tokens).map(([t, k]) => [t, createHash("sha256").update(k).digest("hex")]))));
const bearer = (k: string) => {
  const md = new Metadata();
  md.set("authorization", `Bearer ${k}`);
  return md;
};

describe("tenant authentication (FREEKV_AUTH_TOKENS_FILE)", () => {
  let tiers: Tiers;
  beforeAll(async () => {
    tiers = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...QUIET, FREEKV_THREADS: "1", FREEKV_AUTH_TOKENS_FILE: file, FREEKV_OPENAI_PORT: "0" } });
  }, 120_000);
  afterAll(async () => {
    await tiers?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it("refuses calls without a valid token and touches nothing", async () => {
    const client = new FreeKvClient(tiers.compute.address, { retry: { maxAttempts: 1 } });
    try {
      const prompt = { $case: "text" as const, value: "hello" };
      for (const md of [new Metadata(), bearer("not-a-token"), bearer(`${tokens.alpha}x`)]) {
        await expect(client.createSession({ sessionId: `s-${randomBytes(4).toString("hex")}`, kind: 1 }, { metadata: md })).rejects.toMatchObject({ code: status.UNAUTHENTICATED });
        await expect(client.generateText({ prompt, maxTokens: 2 }, { metadata: md })).rejects.toMatchObject({ code: status.UNAUTHENTICATED });
      }
      expect(metricValue(await fetchMetrics(tiers.compute.metricsPort), "freekv_compute_sessions")).toBe(0);
      // With a token, the same calls work.
      const r = await client.generateText({ prompt, maxTokens: 3 }, { metadata: bearer(tokens.beta) });
      expect(r.tokenIds.length).toBe(3);
    } finally {
      client.close();
    }
  });

  it("keeps a tenant's session to that tenant", async () => {
    const client = new FreeKvClient(tiers.compute.address, { retry: { maxAttempts: 1 } });
    const sid = `alpha-${randomBytes(4).toString("hex")}`;
    const a = { metadata: bearer(tokens.alpha) };
    const b = () => ({ metadata: bearer(tokens.beta) });
    try {
      await client.createSession({ sessionId: sid, kind: 1 }, a);
      const prompt = { $case: "tokens" as const, value: { ids: Array.from({ length: 12 }, (_, i) => 5 + ((i * 37) % 300)) } };
      await expect(client.generateText({ sessionId: sid, prompt, maxTokens: 2 }, b())).rejects.toMatchObject({ code: status.PERMISSION_DENIED });
      // A prompt past the session's context says nothing about it to another tenant (not its length).
      const huge = { $case: "tokens" as const, value: { ids: new Array<number>(300_000).fill(7) } };
      await expect(client.generateText({ sessionId: sid, prompt: huge, maxTokens: 2 }, b())).rejects.toMatchObject({ code: status.PERMISSION_DENIED });
      await expect(client.getSession({ sessionId: sid }, b())).rejects.toMatchObject({ code: status.PERMISSION_DENIED });
      await expect(client.closeSession({ sessionId: sid }, b())).rejects.toMatchObject({ code: status.PERMISSION_DENIED });
      // B's attempts left the session as it was: A continues it from an empty context.
      const got = await client.getSession({ sessionId: sid }, { metadata: bearer(tokens.alpha) });
      expect(Number(got.session?.contextTokens)).toBe(0);
      const r = await client.generateText({ sessionId: sid, prompt, maxTokens: 4 }, { metadata: bearer(tokens.alpha) });
      expect(r.tokenIds.length).toBe(4);
      // The OpenAI front: the same token as an Authorization header.
      const base = `http://127.0.0.1:${tiers.compute.openaiPort}`;
      const body = (model: string) => JSON.stringify({ model, prompt: "hi", max_tokens: 2 });
      expect((await fetch(`${base}/v1/models`)).status).toBe(401);
      const models = await fetch(`${base}/v1/models`, { headers: { authorization: `Bearer ${tokens.alpha}` } });
      const model = ((await models.json()) as { data: { id: string }[] }).data[0].id;
      expect((await fetch(`${base}/v1/completions`, { method: "POST", headers: { "content-type": "application/json" }, body: body(model) })).status).toBe(401);
      // Without a token nothing is said about the request before the 401: not the served model's
      // name (a wrong one would be 404 naming it), not a body's errors.
      for (const [url, b] of [
        ["/v1/completions", body("another-model")],
        ["/v1/chat/completions", "{not json"],
        ["/v1/completions", JSON.stringify({ model, prompt: "hi", max_tokens: -1 })],
      ]) {
        const r = await fetch(`${base}${url}`, { method: "POST", headers: { "content-type": "application/json", authorization: "Bearer wrong\ttoken" }, body: b });
        expect(r.status, `${url} ${b}`).toBe(401);
        expect(await r.text()).not.toContain(model);
      }
      const ok = await fetch(`${base}/v1/completions`, { method: "POST", headers: { "content-type": "application/json", authorization: `Bearer ${tokens.alpha}` }, body: body(model) });
      expect(ok.status).toBe(200);
      const other = await fetch(`${base}/v1/completions`, { method: "POST", headers: { "content-type": "application/json", authorization: `Bearer ${tokens.beta}`, "x-freekv-session-id": sid }, body: body(model) });
      expect(other.status).toBe(403);
      await client.closeSession({ sessionId: sid }, { metadata: bearer(tokens.alpha) });
    } finally {
      client.close();
    }
  });

  it("keeps an attention session to its tenant on the Attention stream", async () => {
    const client = new FreeKvClient(tiers.compute.address, { retry: { maxAttempts: 1 } });
    const sid = `att-${randomBytes(4).toString("hex")}`;
    const G = { layers: 1, queryHeads: 2, kvHeads: 1, headDim: 16, kvDtype: 1 };
    await client.createSession({ sessionId: sid, kind: 2, geometry: G, retrieval: { pageSize: 16, sinkTokens: 16, windowTokens: 16, selectTokens: 32 }, maxContextTokens: 256 }, { metadata: bearer(tokens.alpha) });
    const n = 8;
    const kv = () => writeTensor(Float32Array.from({ length: n * G.kvHeads * G.headDim }, () => Math.random() * 2 - 1), [n, G.kvHeads, G.headDim], 1);
    const prefill = (md: Metadata) =>
      new Promise<{ code: number } | "ok">((resolve) => {
        const stub = computeClient(tiers.compute.address);
        const call = stub.attention(md);
        call.on("data", (m: AttentionResponse) => {
          if (m.result?.$case === "prefill") {
            resolve("ok");
            call.end();
          }
        });
        call.on("error", (e: ServiceError) => resolve({ code: e.code }));
        call.on("end", () => stub.close());
        call.write(AttentionRequest.fromPartial({ requestId: 1, op: { $case: "prefill", value: { sessionId: sid, layer: 0, k: kv(), v: kv() } } }));
      });
    expect(await prefill(bearer(tokens.beta))).toEqual({ code: status.PERMISSION_DENIED });
    expect(await prefill(new Metadata())).toEqual({ code: status.UNAUTHENTICATED });
    expect(await prefill(bearer(tokens.alpha))).toBe("ok");
    const got = await client.getSession({ sessionId: sid }, { metadata: bearer(tokens.alpha) });
    expect(Number(got.session?.contextTokens)).toBe(n); // only alpha's prefill reached the session
    await client.closeSession({ sessionId: sid }, { metadata: bearer(tokens.alpha) });
    client.close();
  });

  it("stops compute at start on a tokens file that is not valid", async () => {
    const bad = join(dir, "bad.json");
    writeFileSync(bad, JSON.stringify({ alpha: "not-a-hash" }));
    const kv = await startService("kvstore", { env: { ...QUIET, FREEKV_KVSTORE_PORT: "0", FREEKV_KVSTORE_METRICS_PORT: "0" } });
    try {
      await expect(
        startService("compute", { env: { ...QUIET, FREEKV_COMPUTE_PORT: "0", FREEKV_COMPUTE_METRICS_PORT: "0", FREEKV_KVSTORE_ADDR: kv.address, FREEKV_AUTH_TOKENS_FILE: bad }, timeoutMs: 30_000 }),
      ).rejects.toThrow(/FREEKV_AUTH_TOKENS_FILE.*64-digit hex SHA-256/s);
    } finally {
      await kv.stop();
    }
  });
});
