/**
 * Sessions are bounded per tenant and in time, with real processes: a tenant (`x-freekv-tenant`)
 * past FREEKV_MAX_SESSIONS_PER_TENANT gets RESOURCE_EXHAUSTED naming the quota while other tenants
 * are unaffected, and closing one makes room; a session idle longer than
 * FREEKV_SESSION_IDLE_TIMEOUT_S is closed (the kvstore releases its memory, counted and logged)
 * while one in use is kept, and so is one whose next turn waits in the admission queue.
 */
import { Metadata, status, type ServiceError } from "@grpc/grpc-js";
import { afterAll, describe, expect, it } from "vitest";
import { CreateSessionRequest, GenerateRequest, type ComputeServiceClient, type CreateSessionResponse, type GenerateFinal, type GenerateResponse } from "../../proto/gen/freekv/v1/compute.js";
import { QUIET, computeClient, fetchMetrics, kvstoreClient, metricValue, startTiers, unary, type Tiers } from "../helpers/services.js";

const R = { pageSize: 16, sinkTokens: 32, windowTokens: 64, selectTokens: 256 };
let tiers: Tiers;
let compute: ComputeServiceClient;

async function start(env: Record<string, string>): Promise<void> {
  compute?.close();
  await tiers?.stop();
  tiers = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...QUIET, FREEKV_LOG_LEVEL: "info", ...env } });
  compute = computeClient(tiers.compute.address);
}

afterAll(async () => {
  compute?.close();
  await tiers?.stop();
});

function create(sessionId: string, tenant?: string): Promise<CreateSessionResponse> {
  const md = new Metadata();
  if (tenant !== undefined) md.set("x-freekv-tenant", tenant);
  return new Promise((resolve, reject) =>
    compute.createSession(CreateSessionRequest.fromPartial({ sessionId, retrieval: R as never, maxContextTokens: 256 }), md, { deadline: Date.now() + 10_000 }, (e: ServiceError | null, r: CreateSessionResponse) =>
      e ? reject(e) : resolve(r),
    ),
  );
}

const kvSessions = async () => {
  const kv = kvstoreClient(tiers.kvstore.address);
  try {
    return (await unary<{ sessionIds: string[] }>(kv, "listSessions", {})).sessionIds;
  } finally {
    kv.close();
  }
};

describe("session bounds", () => {
  it("a tenant past FREEKV_MAX_SESSIONS_PER_TENANT gets RESOURCE_EXHAUSTED naming the quota; others are unaffected", async () => {
    await start({ FREEKV_MAX_SESSIONS_PER_TENANT: "2" });
    await create("q-a1", "acme");
    await create("q-a2", "acme");
    const e = await create("q-a3", "acme").catch((x: ServiceError) => x);
    expect(e).toMatchObject({ code: status.RESOURCE_EXHAUSTED });
    expect((e as ServiceError).details).toMatch(/tenant "acme" has 2 open sessions, the most FREEKV_MAX_SESSIONS_PER_TENANT=2 allows/);
    expect(await kvSessions()).not.toContain("q-a3");
    // Another tenant, and calls without the header (one tenant of their own), have their own quota.
    await create("q-b1", "globex");
    await create("q-n1");
    // Closing one makes room.
    await unary(compute, "closeSession", { sessionId: "q-a1" });
    await create("q-a3", "acme");
    for (const id of ["q-a2", "q-a3", "q-b1", "q-n1"]) await unary(compute, "closeSession", { sessionId: id });
  }, 60_000);

  it("a session idle past FREEKV_SESSION_IDLE_TIMEOUT_S is closed and released; one in use is kept", async () => {
    await start({ FREEKV_SESSION_IDLE_TIMEOUT_S: "1.5" });
    await create("idle-1", "t-idle");
    await create("busy-1", "t-idle");
    expect(await kvSessions()).toEqual(expect.arrayContaining(["idle-1", "busy-1"]));
    const end = Date.now() + 3500;
    while (Date.now() < end) {
      await unary(compute, "getSession", { sessionId: "busy-1" });
      await new Promise((r) => setTimeout(r, 300));
    }
    const e = await unary(compute, "getSession", { sessionId: "idle-1" }).catch((x: ServiceError) => x);
    expect(e).toMatchObject({ code: status.NOT_FOUND });
    const held = await kvSessions();
    expect(held).not.toContain("idle-1");
    expect(held).toContain("busy-1");
    expect(metricValue(await fetchMetrics(tiers.compute.metricsPort), "freekv_compute_sessions_expired_total")).toBeGreaterThanOrEqual(1);
    expect(tiers.compute.output.join("\n")).toMatch(/"session":"idle-1".*session expired: idle longer than FREEKV_SESSION_IDLE_TIMEOUT_S/);
    await unary(compute, "closeSession", { sessionId: "busy-1" });
  }, 60_000);

  it("a turn waiting in the admission queue keeps its session from idle expiry", async () => {
    // One running slot, held by a long stateless request; the named session's next turn queues
    // behind it for longer than the idle timeout, holding only its turn lock.
    await start({ FREEKV_SESSION_IDLE_TIMEOUT_S: "1", FREEKV_MAX_RUNNING_REQUESTS: "1", FREEKV_PREFILL_CHUNK_TOKENS: "1" });
    await create("queued-1");
    const first = await run({ sessionId: "queued-1", prompt: tokens(4), maxTokens: 3 });
    expect(first.final).toBeDefined();
    const long = run({ prompt: tokens(1200), maxTokens: 2000, ignoreEos: true }, 120_000);
    await new Promise((r) => setTimeout(r, 300));
    const turn = await run({ sessionId: "queued-1", prompt: tokens(2), maxTokens: 3 }, 120_000);
    // It did wait past the timeout (else this test shows nothing), and kept its session.
    expect(turn.error).toBeUndefined();
    expect(turn.final!.usage!.queueMs).toBeGreaterThan(1500);
    expect(turn.final!.usage!.contextTokens).toBe(first.final!.usage!.contextTokens + 2 + 3);
    expect((await long).final).toBeDefined();
    expect(metricValue(await fetchMetrics(tiers.compute.metricsPort), "freekv_compute_sessions_expired_total") ?? 0).toBe(0);
    await unary(compute, "closeSession", { sessionId: "queued-1" });
  }, 180_000);
});

let nextToken = 11;
const tokens = (n: number) => ({ $case: "tokens" as const, value: { ids: Array.from({ length: n }, () => 3 + (nextToken++ * 7919) % 400) } });

function run(req: Partial<GenerateRequest>, deadlineMs = 30_000): Promise<{ final?: GenerateFinal; error?: ServiceError }> {
  return new Promise((resolve) => {
    const out: { final?: GenerateFinal; error?: ServiceError } = {};
    const call = compute.generate(GenerateRequest.fromPartial({ sampling: { temperature: 0, topP: 0, topK: 0, seed: 0 }, ...req }), new Metadata(), { deadline: Date.now() + deadlineMs });
    call.on("data", (m: GenerateResponse) => {
      if (m.event?.$case === "final") out.final = m.event.value;
    });
    call.on("error", (e: ServiceError) => resolve({ ...out, error: e }));
    call.on("end", () => resolve(out));
  });
}
