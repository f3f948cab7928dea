/**
 * A seeded fuzz of compute's gRPC API with both tiers as processes (built-in model, a small
 * kvstore): random well-formed requests (random ids, sizes, retrieval settings, prompts, sampling)
 * and random bytes sent to every unary and server-streaming method. Whatever arrives, each call
 * ends with a status a client can act on (never INTERNAL or UNKNOWN), no process dies, both stay
 * SERVING, and once the sessions the fuzz created are closed the kvstore holds nothing.
 * A control session generates before and after the fuzz: its continuation equals a fresh run over
 * what it holds, and compute's resident memory after the fuzz stays near where it started.
 * FREEKV_TEST_SEED replays a run; FREEKV_FUZZ_CALLS sets its length (20,000 in CI; 200,000 or
 * more by hand: `FREEKV_FUZZ_CALLS=200000 npx vitest run test/fault/fuzz.test.ts`) and
 * FREEKV_FUZZ_CONCURRENCY the calls in flight (16).
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Client, Metadata, credentials, status, type ServiceError } from "@grpc/grpc-js";
import { readFileSync } from "node:fs";
import { CloseSessionRequest, CreateSessionRequest, GenerateRequest, GetSessionRequest, type GenerateResponse } from "../../proto/gen/freekv/v1/compute.js";
import { healthCheck } from "../../tools/dev/health-probe.js";
import { prng } from "../helpers/prng.js";
import { QUIET, computeClient, fetchMetrics, kvstoreClient, metricValue, startTiers, unary, type Tiers } from "../helpers/services.js";

const seed = Number(process.env.FREEKV_TEST_SEED ?? Date.now() % 1e9);
const CALLS = Number(process.env.FREEKV_FUZZ_CALLS ?? 20_000);
const CONCURRENCY = Number(process.env.FREEKV_FUZZ_CONCURRENCY ?? 16);
const rand = prng(seed);
const int = (n: number) => Math.floor(rand() * n);
const pick = <T>(xs: readonly T[]): T => xs[int(xs.length)];
const SERVICE = "/freekv.v1.ComputeService/";

/** Statuses a fuzzed call may end with: anything a client can act on. */
const ALLOWED = new Set([status.OK, status.INVALID_ARGUMENT, status.NOT_FOUND, status.FAILED_PRECONDITION, status.RESOURCE_EXHAUSTED, status.ALREADY_EXISTS, status.DEADLINE_EXCEEDED, status.UNAVAILABLE, status.OUT_OF_RANGE, status.CANCELLED, status.UNIMPLEMENTED]);

function randomString(): string {
  return pick([
    () => "",
    () => `s-${int(8)}`,
    () => "x".repeat(int(3) === 0 ? 200_000 : int(300)),
    () => String.fromCodePoint(...Array.from({ length: 1 + int(40) }, () => 32 + int(0x2fff))),
    () => "\u0000\n\t../../etc/passwd",
  ])();
}
const big = () => pick([0, 1, 7, 16, 255, 4096, 65_535, 1 << 20, 2 ** 31 - 1, 2 ** 32 - 1]);

function randomRetrieval() {
  return int(3) === 0
    ? undefined
    : { pageSize: big(), sinkTokens: big(), windowTokens: big(), selectTokens: big(), tau: rand() * 4 - 2, tauSet: rand() < 0.5, summary: int(5), combine: int(5), mode: int(8), recall: int(4), denseLayers: Array.from({ length: int(4) }, () => int(10)) };
}

/** A random request of `method` and the session id it names. */
function randomRequest(method: string, known: string[]): { body: Buffer; sessionId: string } {
  const id = known.length && rand() < 0.5 ? pick(known) : randomString();
  return { body: encode(method, id, known), sessionId: id };
}

function encode(method: string, id: string, _known: string[]): Buffer {
  switch (method) {
    case "CreateSession":
      return Buffer.from(CreateSessionRequest.encode(CreateSessionRequest.fromPartial({ sessionId: id, kind: int(4), maxContextTokens: rand() < 0.5 ? 64 + int(2048) : big(), retrieval: randomRetrieval(), geometry: rand() < 0.3 ? { layers: big(), queryHeads: big(), kvHeads: big(), headDim: big(), kvDtype: int(5) } : undefined })).finish());
    case "GetSession":
      return Buffer.from(GetSessionRequest.encode({ sessionId: id }).finish());
    case "CloseSession":
      return Buffer.from(CloseSessionRequest.encode({ sessionId: id }).finish());
    default: {
      const prompt = pick([
        () => ({ $case: "text" as const, value: randomString() }),
        () => ({ $case: "tokens" as const, value: { ids: Array.from({ length: int(64) }, () => (rand() < 0.9 ? int(600) : big())) } }),
        () => ({ $case: "chat" as const, value: { messages: Array.from({ length: int(4) }, () => ({ role: pick(["user", "system", "assistant", randomString()]), content: randomString().slice(0, 500) })) } }),
        () => undefined,
      ])();
      return Buffer.from(
        GenerateRequest.encode(
          GenerateRequest.fromPartial({ sessionId: rand() < 0.6 ? "" : id, prompt, maxTokens: rand() < 0.8 ? int(12) : big(), sampling: { temperature: rand() * 3 - 0.5, topP: rand() * 2 - 0.5, topK: int(2000), seed: int(1000) }, stopTokenIds: [int(600)], stopStrings: rand() < 0.3 ? [randomString().slice(0, 50)] : [], retrieval: randomRetrieval() }),
        ).finish(),
      );
    }
  }
}

/** Tokens of a greedy Generate (throws on an error status). */
function greedy(client: ReturnType<typeof computeClient>, req: Partial<GenerateRequest>): Promise<number[]> {
  return new Promise((resolve, reject) => {
    const out: number[] = [];
    const call = client.generate(GenerateRequest.fromPartial(req), new Metadata(), { deadline: Date.now() + 60_000 });
    call.on("data", (m: GenerateResponse) => {
      if (m.event?.$case === "chunk") out.push(...m.event.value.tokenIds);
    });
    call.on("error", reject);
    call.on("end", () => resolve(out));
  });
}

/** RssAnon / RssShmem of a process, MiB (where its resident memory is). */
function rssParts(pid: number): string {
  const st = readFileSync(`/proc/${pid}/status`, "utf8");
  const kb = (k: string) => Number(new RegExp(`${k}:\\s+(\\d+) kB`).exec(st)?.[1] ?? NaN);
  return `anonymous ${(kb("RssAnon") / 1024).toFixed(0)} MiB, shared memory ${(kb("RssShmem") / 1024).toFixed(0)} MiB`;
}

function rssBytes(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
  return m ? Number(m[1]) * 1024 : NaN;
}

describe(`fuzz of the compute API (seed ${seed}, FREEKV_TEST_SEED)`, () => {
  let tiers: Tiers;
  beforeAll(async () => {
    tiers = await startTiers({ kvstoreEnv: { ...QUIET, FREEKV_KVSTORE_CAPACITY_BYTES: String(256 << 20) }, computeEnv: { ...QUIET, FREEKV_THREADS: "1", FREEKV_QUEUE_MAX_REQUESTS: "8" } });
  }, 120_000);
  afterAll(async () => tiers?.stop());

  it("ends every call with an actionable status, keeps both processes serving, leaves a control session exact and leaks no session", { timeout: 1_800_000 }, async () => {
    const raw = new Client(tiers.compute.address, credentials.createInsecure(), { "grpc.max_send_message_length": 64 << 20 });
    const id = (b: Buffer) => b;
    const created = new Set<string>();
    const seen = new Map<number, number>();
    const bad: string[] = [];
    // The control session: a named model session with one greedy turn before the fuzz.
    const compute = computeClient(tiers.compute.address);
    const ctrl = "fuzz-control";
    const R = { pageSize: 16, sinkTokens: 16, windowTokens: 32, selectTokens: 64 };
    await unary(compute, "createSession", { sessionId: ctrl, retrieval: R, maxContextTokens: 1024 });
    const p1 = Array.from({ length: 90 }, () => 3 + int(500));
    const t1 = await greedy(compute, { sessionId: ctrl, prompt: { $case: "tokens", value: { ids: p1 } }, maxTokens: 12 });
    const rssBefore = rssBytes(tiers.compute.child.pid!);
    let next = 0;
    const worker = async () => {
      for (let i = next++; i < CALLS; i = next++) {
        const method = pick(["CreateSession", "GetSession", "CloseSession", "Generate", "Generate"]);
        const fuzzed = rand() < 0.2 ? { body: Buffer.from(Array.from({ length: int(300) }, () => int(256))), sessionId: "" } : randomRequest(method, [...created]);
        let details = "";
        const code = await new Promise<number>((resolve) => {
          const deadline = Date.now() + 60_000;
          if (method === "Generate") {
            const call = raw.makeServerStreamRequest(SERVICE + method, id, id, fuzzed.body, new Metadata(), { deadline });
            call.on("data", () => {});
            call.on("error", (e: ServiceError) => ((details = e.details), resolve(e.code)));
            call.on("end", () => resolve(status.OK));
          } else {
            raw.makeUnaryRequest(SERVICE + method, id, id, fuzzed.body, new Metadata(), { deadline }, (e: ServiceError | null) => ((details = e?.details ?? ""), resolve(e ? e.code : status.OK)));
          }
        });
        seen.set(code, (seen.get(code) ?? 0) + 1);
        if (!ALLOWED.has(code)) bad.push(`call ${i} ${method}: ${status[code]} ${details.slice(0, 300)}`);
        // Sessions it made are named again by later calls (some of which continue or close them).
        if (method === "CreateSession" && code === status.OK && fuzzed.sessionId) created.add(fuzzed.sessionId);
      }
    };
    const t0 = Date.now();
    await Promise.all(Array.from({ length: CONCURRENCY }, worker));
    const seconds = (Date.now() - t0) / 1000;
    console.log(`fuzz: ${CALLS} calls in ${seconds.toFixed(0)} s (${CONCURRENCY} in flight), statuses ${JSON.stringify(Object.fromEntries([...seen].map(([c, n]) => [status[c], n])))}`);
    raw.close();
    expect(bad, `statuses seen ${JSON.stringify(Object.fromEntries([...seen].map(([c, n]) => [status[c], n])))}`).toEqual([]);
    // Both processes alive and serving.
    expect(tiers.compute.child.exitCode).toBeNull();
    expect(tiers.kvstore.child.exitCode).toBeNull();
    expect(await healthCheck(tiers.compute.address)).toBe("SERVING");
    expect(await healthCheck(tiers.kvstore.address)).toBe("SERVING");
    // Close what the fuzz created: then the kvstore holds nothing (stateless calls released theirs).
    // Close what the fuzz created (its sessions may hold the whole capacity, and a turn then
    // waits for memory): then the kvstore holds only the control session.
    const kv = kvstoreClient(tiers.kvstore.address);
    const { sessionIds } = await unary<{ sessionIds: string[] }>(kv, "listSessions", {});
    for (const sid of sessionIds) if (sid !== ctrl) await unary(compute, "closeSession", { sessionId: sid }).catch(() => undefined);
    // The control session continues exactly like a fresh run over what it holds.
    const p2 = Array.from({ length: 9 }, () => 3 + int(500));
    const t2 = await greedy(compute, { sessionId: ctrl, prompt: { $case: "tokens", value: { ids: p2 } }, maxTokens: 10 });
    const held = [...p1, ...t1, ...p2];
    const ref = await greedy(compute, { prompt: { $case: "tokens", value: { ids: held } }, maxTokens: 10, retrieval: R as never });
    expect(t2).toEqual(ref);
    // Compute's resident memory is back near where it started (no growth per call).
    const rssAfter = rssBytes(tiers.compute.child.pid!);
    const m = await fetchMetrics(tiers.compute.metricsPort);
    const mib = (name: string) => ((metricValue(m, name) ?? NaN) / 2 ** 20).toFixed(0);
    console.log(`fuzz: compute RSS ${(rssBefore / 2 ** 20).toFixed(0)} MiB before, ${(rssAfter / 2 ** 20).toFixed(0)} MiB after (V8 heap used ${mib("freekv_nodejs_heap_size_used_bytes")} of ${mib("freekv_nodejs_heap_size_total_bytes")} MiB, external ${mib("freekv_nodejs_external_memory_bytes")} MiB; ${rssParts(tiers.compute.child.pid!)})`);
    expect(rssAfter).toBeLessThan(rssBefore * 1.5 + (256 << 20));

    await unary(compute, "closeSession", { sessionId: ctrl });
    const stats = await unary<{ sessions: number; segmentBytes: number }>(kv, "getStats", {});
    expect(stats.sessions).toBe(0);
    expect(Number(stats.segmentBytes)).toBe(0);
    kv.close();
    compute.close();
  });
});
