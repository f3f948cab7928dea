/**
 * A call's end (its deadline or its client's cancel) with real processes:
 * - a CreateSession that completes after its deadline leaves no session (the caller never learns
 *   the generated id, so nobody could close it);
 * - a Generate waiting for a busy session's lock, and a CloseSession waiting behind a Generate,
 *   end at their deadlines instead of when the lock frees;
 * - a named session's turn that cannot fit its context is refused before its reservation grows;
 * - a request cancelled as its answer ends is counted once among the requests, not twice.
 * (test/unit/call-ends.test.ts has the same ends at the unit level, where the timing is exact.)
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Metadata, status, type ServiceError } from "@grpc/grpc-js";
import { GenerateRequest, type ComputeServiceClient, type GenerateResponse } from "../../proto/gen/freekv/v1/compute.js";
import { prng } from "../helpers/prng.js";
import { QUIET, computeClient, fetchMetrics, kvstoreClient, startTiers, unary, type Tiers } from "../helpers/services.js";

const VOCAB = 512; // the built-in model's
const R = { pageSize: 16, sinkTokens: 32, windowTokens: 64, selectTokens: 128 };
let tiers: Tiers;
let client: ComputeServiceClient;
beforeAll(async () => {
  tiers = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...QUIET, FREEKV_THREADS: "2" } });
  client = computeClient(tiers.compute.address);
}, 60_000);
afterAll(() => {
  client?.close();
  return tiers?.stop();
});

const randomTokens = (n: number, rand: () => number) => Array.from({ length: n }, () => 3 + Math.floor(rand() * (VOCAB - 3)));

interface Run {
  tokens: number;
  error?: ServiceError;
  endedAt: number;
}
function generate(req: Partial<GenerateRequest>, deadlineMs: number): Promise<Run> {
  return new Promise((resolve) => {
    let tokens = 0;
    const call = client.generate(GenerateRequest.fromPartial(req), new Metadata(), { deadline: Date.now() + deadlineMs });
    call.on("data", (m: GenerateResponse) => {
      if (m.event?.$case === "chunk") tokens += m.event.value.tokenIds.length;
    });
    call.on("error", (e: ServiceError) => resolve({ tokens, error: e, endedAt: performance.now() }));
    call.on("end", () => resolve({ tokens, endedAt: performance.now() }));
  });
}

async function kvHeld(): Promise<{ sessions: string[]; reserved: number }> {
  const kv = kvstoreClient(tiers.kvstore.address);
  try {
    const list = await unary<{ sessionIds: string[] }>(kv, "listSessions", {});
    const stats = await unary<{ reservedBytes: number }>(kv, "getStats", {});
    return { sessions: list.sessionIds, reserved: Number(stats.reservedBytes) };
  } finally {
    kv.close();
  }
}

describe("call ends", () => {
  it("CreateSession calls whose deadline passes leave no session behind", async () => {
    const rand = prng(0xc4ea7e);
    const before = await kvHeld();
    const results = await Promise.all(
      Array.from({ length: 40 }, () =>
        unary(client, "createSession", { maxContextTokens: 32768, retrieval: R }, 2 + Math.floor(rand() * 60)).then(
          () => "ok",
          (e: ServiceError) => e.code,
        ),
      ),
    );
    // Whatever each caller was told, a session it was told about is the only kind that may stay.
    const told = results.filter((r) => r === "ok").length;
    for (const r of results) if (r !== "ok") expect([status.DEADLINE_EXCEEDED, status.CANCELLED]).toContain(r);
    const deadline = Date.now() + 10_000;
    let held = await kvHeld();
    while (held.sessions.length > before.sessions.length + told && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 100));
      held = await kvHeld();
    }
    expect(held.sessions.length - before.sessions.length, `results ${JSON.stringify(results)}`).toBe(told);
    // Close what the callers were told about (none, usually) to leave the store as found.
    for (const id of held.sessions.filter((x) => !before.sessions.includes(x))) await unary(client, "closeSession", { sessionId: id });
  }, 60_000);

  it("a turn that cannot fit a named session's context is refused before its reservation grows", async () => {
    const rand = prng(0xf17);
    // The first turn reserves one extent (2048 tokens); a turn past max_context_tokens must not
    // grow the reservation towards it before it is refused.
    const created = await unary<{ session: { sessionId: string } }>(client, "createSession", { maxContextTokens: 8192, retrieval: R });
    const id = created.session.sessionId;
    const first = await generate({ sessionId: id, prompt: { $case: "tokens", value: { ids: randomTokens(40, rand) } }, maxTokens: 8 }, 30_000);
    expect(first.error).toBeUndefined();
    const before = await kvHeld();
    const r = await generate({ sessionId: id, prompt: { $case: "tokens", value: { ids: randomTokens(8200, rand) } }, maxTokens: 4 }, 30_000);
    expect(r.error?.code).toBe(status.INVALID_ARGUMENT);
    expect(r.error?.details).toMatch(/do not fit the session's context/);
    const bad = await generate({ sessionId: id, prompt: { $case: "tokens", value: { ids: [VOCAB + 7] } }, maxTokens: 4 }, 30_000);
    expect(bad.error?.code).toBe(status.INVALID_ARGUMENT);
    const after = await kvHeld();
    expect(after.reserved).toBe(before.reserved);
    await unary(client, "closeSession", { sessionId: id });
  }, 60_000);

  it("a Generate behind a busy session and a CloseSession behind a Generate end at their deadlines", async () => {
    const rand = prng(0xb05e);
    const created = await unary<{ session: { sessionId: string } }>(client, "createSession", { maxContextTokens: 4096, retrieval: R });
    const id = created.session.sessionId;
    const long = generate({ sessionId: id, prompt: { $case: "tokens", value: { ids: randomTokens(64, rand) } }, maxTokens: 3000, ignoreEos: true }, 120_000);
    await new Promise((r) => setTimeout(r, 300));
    const t0 = performance.now();
    const second = await generate({ sessionId: id, prompt: { $case: "tokens", value: { ids: randomTokens(8, rand) } }, maxTokens: 4 }, 400);
    const closeErr = await unary(client, "closeSession", { sessionId: id }, 400).then(
      () => undefined,
      (e: ServiceError) => e,
    );
    const waited = performance.now() - t0;
    const first = await long;
    // The long generation was still running when both calls gave up (or it ended by EOS first:
    // then the calls above found the lock free and nothing is shown; retried with another seed).
    expect(first.endedAt - t0, "the long generation ended before the two calls gave up").toBeGreaterThan(waited);
    expect(second.error?.code).toBe(status.DEADLINE_EXCEEDED);
    expect(closeErr?.code).toBe(status.DEADLINE_EXCEEDED);
    expect(waited).toBeLessThan(5_000);
    expect(first.error).toBeUndefined();
    // The session is still open (the close gave up before it started) and closes now.
    const got = await unary<{ session: { sessionId: string } }>(client, "getSession", { sessionId: id });
    expect(got.session.sessionId).toBe(id);
    await unary(client, "closeSession", { sessionId: id });
  }, 180_000);

  it("a request cancelled as its answer ends is counted once in freekv_generate_requests_total", async () => {
    const rand = prng(0xc0a7);
    const created = await unary<{ session: { sessionId: string } }>(client, "createSession", { maxContextTokens: 4096, retrieval: R });
    const id = created.session.sessionId;
    const total = async () => {
      const text = await fetchMetrics(tiers.compute.metricsPort);
      return text
        .split("\n")
        .filter((l) => l.startsWith("freekv_generate_requests_total{"))
        .reduce((a, l) => a + Number(l.slice(l.lastIndexOf(" ") + 1)), 0);
    };
    const before = await total();
    const N = 6,
      calls = 6;
    const outcomes: string[] = [];
    for (let i = 0; i < calls; i++) {
      // Cancelled right after its last chunk: while the turn's end is committed and its final
      // event is sent (counted then as cancelled), or after it is out (counted by its reason).
      const r = await new Promise<string>((resolve) => {
        let got = 0;
        const call = client.generate(
          GenerateRequest.fromPartial({ sessionId: id, prompt: { $case: "tokens", value: { ids: randomTokens(4, rand) } }, maxTokens: N, stopTokenIds: [] }),
          new Metadata(),
          { deadline: Date.now() + 30_000 },
        );
        call.on("data", (m: GenerateResponse) => {
          if (m.event?.$case === "chunk" && (got += m.event.value.tokenIds.length) >= N) call.cancel();
        });
        call.on("error", (e: ServiceError) => resolve(status[e.code]));
        call.on("end", () => resolve("final"));
      });
      outcomes.push(r);
    }
    // Every request is counted, once (its count lands as its call ends on the server).
    const deadline = Date.now() + 10_000;
    while ((await total()) < before + calls && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    await new Promise((r) => setTimeout(r, 300));
    expect(await total(), `outcomes ${outcomes.join(",")}`).toBe(before + calls);
    await unary(client, "closeSession", { sessionId: id });
  }, 120_000);
});
