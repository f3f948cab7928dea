/**
 * @freekv/client (packages/client): against the real services (built-in model), its Generate
 * helpers give exactly what the raw generated stub gives for the same requests; against fake
 * compute servers in this process, it retries UNAVAILABLE with backoff only while nothing was
 * delivered, follows `x-freekv-session-owner` to the session's pod and remembers it, honours
 * deadlines and cancellation.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Metadata, Server, ServerCredentials, status, type ServerWritableStream, type ServiceError, type UntypedServiceImplementation } from "@grpc/grpc-js";
import { backoffMs, FreeKvClient, SESSION_OWNER_KEY } from "../../packages/client/src/index.js";
import { ComputeServiceService, CreateSessionRequest, GenerateRequest, GenerateResponse } from "../../proto/gen/freekv/v1/compute.js";
import { prng } from "../helpers/prng.js";
import { QUIET, computeClient, startTiers, type Tiers } from "../helpers/services.js";

/** The raw stub's Generate: every response, in order. */
function rawGenerate(address: string, req: GenerateRequest): Promise<GenerateResponse[]> {
  const c = computeClient(address);
  return new Promise((resolve, reject) => {
    const out: GenerateResponse[] = [];
    const call = c.generate(req, { deadline: Date.now() + 60_000 });
    call.on("data", (m: GenerateResponse) => out.push(m));
    call.on("error", (e) => (c.close(), reject(e)));
    call.on("end", () => (c.close(), resolve(out)));
  });
}

describe("@freekv/client against the services (built-in model)", () => {
  let tiers: Tiers;
  beforeAll(async () => {
    tiers = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...QUIET, FREEKV_THREADS: "2" } });
  }, 120_000);
  afterAll(async () => tiers?.stop());

  it("generateText and the event iterator give what the raw stub gives; sessions continue", async () => {
    const rand = prng(Number(process.env.FREEKV_TEST_SEED ?? 4242));
    const ids = Array.from({ length: 20 + Math.floor(rand() * 30) }, () => 3 + Math.floor(rand() * 400));
    const req = { prompt: { $case: "tokens" as const, value: { ids } }, maxTokens: 12, sampling: { temperature: 0, topP: 0, topK: 0, seed: 0 } };
    const raw = await rawGenerate(tiers.compute.address, GenerateRequest.fromPartial(req));
    const rawIds = raw.flatMap((m) => (m.event?.$case === "chunk" ? m.event.value.tokenIds : []));
    const client = new FreeKvClient(tiers.compute.address);
    try {
      const r = await client.generateText(req);
      expect(r.tokenIds).toEqual(rawIds);
      expect(r.final.usage?.completionTokens).toBe(rawIds.length);
      const events = [];
      for await (const e of client.generate(req)) events.push(e);
      expect(events.filter((e) => e.type === "chunk").flatMap((e) => (e.type === "chunk" ? e.tokenIds : []))).toEqual(rawIds);
      expect(events[events.length - 1].type).toBe("final");
      // A named session: two turns through the client equal two turns through the stub.
      const sid = `client-${Math.floor(rand() * 1e9)}`;
      await client.createSession({ sessionId: sid, kind: 1 });
      const a1 = await client.generateText({ ...req, sessionId: sid });
      const a2 = await client.generateText({ ...req, sessionId: sid, prompt: { $case: "tokens", value: { ids: ids.slice(0, 5) } } });
      expect(client.addressFor(sid)).toBe(tiers.compute.address);
      await client.closeSession({ sessionId: sid });
      const stub = computeClient(tiers.compute.address);
      await new Promise<void>((res, rej) => stub.createSession(CreateSessionRequest.fromPartial({ sessionId: `${sid}-raw`, kind: 1 }), (e: ServiceError | null) => (e ? rej(e) : res())));
      stub.close();
      const b1 = await rawGenerate(tiers.compute.address, GenerateRequest.fromPartial({ ...req, sessionId: `${sid}-raw` }));
      const b2 = await rawGenerate(tiers.compute.address, GenerateRequest.fromPartial({ ...req, sessionId: `${sid}-raw`, prompt: { $case: "tokens", value: { ids: ids.slice(0, 5) } } }));
      const tok = (ms: GenerateResponse[]) => ms.flatMap((m) => (m.event?.$case === "chunk" ? m.event.value.tokenIds : []));
      expect(a1.tokenIds).toEqual(tok(b1));
      expect(a2.tokenIds).toEqual(tok(b2));
      // Breaking out of the loop cancels the call; the service keeps serving.
      let chunks = 0;
      for await (const e of client.generate({ ...req, maxTokens: 200 })) if (e.type === "chunk" && ++chunks === 2) break;
      expect(chunks).toBe(2);
      expect((await client.generateText(req)).tokenIds).toEqual(rawIds);
    } finally {
      client.close();
    }
  });
});

/** A fake compute service: `generate` as given, everything else UNIMPLEMENTED. */
async function fakeCompute(generate: (call: ServerWritableStream<GenerateRequest, GenerateResponse>) => void, port = 0, unary: UntypedServiceImplementation = {}): Promise<{ address: string; port: number; calls: number; stop(): Promise<void> }> {
  const server = new Server();
  const state = { calls: 0 };
  const unimplemented = (_: unknown, cb: (e: Partial<ServiceError>) => void) => cb({ code: status.UNIMPLEMENTED, details: "fake" });
  const impl: UntypedServiceImplementation = {
    createSession: unimplemented,
    getSession: unimplemented,
    closeSession: unimplemented,
    attention: (call: { end(): void }) => call.end(),
    generate: (call: ServerWritableStream<GenerateRequest, GenerateResponse>) => {
      state.calls++;
      generate(call);
    },
    ...unary,
  };
  server.addService(ComputeServiceService, impl);
  const bound = await new Promise<number>((res, rej) => server.bindAsync(`127.0.0.1:${port}`, ServerCredentials.createInsecure(), (e, p) => (e ? rej(e) : res(p))));
  return {
    address: `127.0.0.1:${bound}`,
    port: bound,
    get calls() {
      return state.calls;
    },
    stop: () => new Promise<void>((res) => server.tryShutdown(() => res())),
  };
}

const chunk = (ids: number[], text: string) => GenerateResponse.fromPartial({ event: { $case: "chunk", value: { tokenIds: ids, text, stepMs: 1, batchSize: 1 } } });
const final = (sessionId: string) => GenerateResponse.fromPartial({ event: { $case: "final", value: { finishReason: 1, sessionId, usage: { completionTokens: 2 } } } });
const streamTwo = (call: ServerWritableStream<GenerateRequest, GenerateResponse>) => {
  call.write(chunk([7], "a"));
  call.write(chunk([8], "b"));
  call.write(final(call.request.sessionId));
  call.end();
};

describe("@freekv/client retries, redirects, deadlines (fake servers)", () => {
  it("retries UNAVAILABLE with backoff until the server is up; gives up after maxAttempts", async () => {
    const probe = await fakeCompute(streamTwo);
    const port = probe.port;
    await probe.stop();
    // The channel's own reconnect backoff short too, so a retry after the server came up connects.
    const late = new FreeKvClient(`127.0.0.1:${port}`, {
      retry: { maxAttempts: 40, initialBackoffMs: 50, maxBackoffMs: 200 },
      defaultDeadlineMs: 20_000,
      channelOptions: { "grpc.initial_reconnect_backoff_ms": 50, "grpc.max_reconnect_backoff_ms": 200 },
    });
    let server: Awaited<ReturnType<typeof fakeCompute>> | undefined;
    const starting = new Promise<void>((r) => setTimeout(async () => ((server = await fakeCompute(streamTwo, port)), r()), 300));
    try {
      const r = await late.generateText({ prompt: { $case: "text", value: "x" }, maxTokens: 2 });
      expect(r.text).toBe("ab");
      await starting;
      expect(server!.calls).toBe(1);
    } finally {
      late.close();
      await starting;
      await server?.stop();
    }
    const once = new FreeKvClient(`127.0.0.1:${port}`, { retry: { maxAttempts: 1 } });
    await expect(once.generateText({ prompt: { $case: "text", value: "x" }, maxTokens: 2 })).rejects.toMatchObject({ code: status.UNAVAILABLE });
    once.close();
  });

  it("never replays a stream that delivered tokens", async () => {
    const flaky = await fakeCompute((call) => {
      call.write(chunk([7], "a"));
      call.emit("error", { code: status.UNAVAILABLE, details: "went away" });
    });
    const client = new FreeKvClient(flaky.address, { retry: { maxAttempts: 5, initialBackoffMs: 1 } });
    const seen: string[] = [];
    await expect(
      (async () => {
        for await (const e of client.generate({ prompt: { $case: "text", value: "x" }, maxTokens: 2 })) if (e.type === "chunk") seen.push(e.text);
      })(),
    ).rejects.toMatchObject({ code: status.UNAVAILABLE });
    expect(seen).toEqual(["a"]);
    expect(flaky.calls).toBe(1);
    client.close();
    await flaky.stop();
  });

  it("follows x-freekv-session-owner to the session's pod and goes there directly afterwards", async () => {
    const owner = await fakeCompute(streamTwo);
    const other = await fakeCompute((call) => {
      const md = new Metadata();
      md.set(SESSION_OWNER_KEY, owner.address);
      call.emit("error", { code: status.FAILED_PRECONDITION, details: "session held by another pod", metadata: md });
    });
    const client = new FreeKvClient(other.address);
    try {
      const r1 = await client.generateText({ sessionId: "s1", prompt: { $case: "text", value: "x" }, maxTokens: 2 });
      expect(r1.text).toBe("ab");
      expect(client.addressFor("s1")).toBe(owner.address);
      await client.generateText({ sessionId: "s1", prompt: { $case: "text", value: "y" }, maxTokens: 2 });
      expect([other.calls, owner.calls]).toEqual([1, 2]);
      // Without a session, calls go to the configured address (which answers with the redirect).
      const none = new FreeKvClient(other.address, { maxRedirects: 0 });
      await expect(none.generateText({ sessionId: "s2", prompt: { $case: "text", value: "x" }, maxTokens: 2 })).rejects.toMatchObject({ code: status.FAILED_PRECONDITION });
      none.close();
    } finally {
      client.close();
      await owner.stop();
      await other.stop();
    }
  });

  it("honours deadlines and cancellation", async () => {
    const silent = await fakeCompute(() => {});
    const client = new FreeKvClient(silent.address);
    const t0 = Date.now();
    await expect(client.generateText({ prompt: { $case: "text", value: "x" }, maxTokens: 2 }, { deadlineMs: 300 })).rejects.toMatchObject({ code: status.DEADLINE_EXCEEDED });
    expect(Date.now() - t0).toBeLessThan(3000);
    const ac = new AbortController();
    setTimeout(() => ac.abort(new Error("caller gave up")), 100);
    await expect(client.generateText({ prompt: { $case: "text", value: "x" }, maxTokens: 2 }, { signal: ac.signal, deadlineMs: 10_000 })).rejects.toThrow(/caller gave up|CANCELLED|Cancelled/);
    client.close();
    await silent.stop();
    // A unary call in flight: cancelled at the server when the caller gives up, not left to its deadline.
    let cancelled = false;
    const hang = await fakeCompute(() => {}, 0, { getSession: (call: { on(e: string, f: () => void): void }) => call.on("cancelled", () => (cancelled = true)) });
    const c2 = new FreeKvClient(hang.address);
    const ac2 = new AbortController();
    setTimeout(() => ac2.abort(new Error("caller gave up on the unary call")), 100);
    const t1 = Date.now();
    await expect(c2.getSession({ sessionId: "s" }, { signal: ac2.signal, deadlineMs: 10_000 })).rejects.toThrow("caller gave up on the unary call");
    expect(Date.now() - t1).toBeLessThan(3000);
    for (let i = 0; i < 100 && !cancelled; i++) await new Promise((r) => setTimeout(r, 20));
    expect(cancelled).toBe(true);
    c2.close();
    await hang.stop();
  });

  it("backs off exponentially with jitter, capped", () => {
    const retry = { maxAttempts: 10, initialBackoffMs: 100, maxBackoffMs: 1000, multiplier: 2 };
    for (let n = 1; n <= 8; n++) {
      const cap = Math.min(1000, 100 * 2 ** (n - 1));
      expect(backoffMs(retry, n, () => 0)).toBe(0);
      expect(backoffMs(retry, n, () => 0.999999)).toBe(Math.floor(0.999999 * cap));
    }
    expect(() => new FreeKvClient("127.0.0.1:1", { retry: { maxAttempts: 0 } })).toThrow(RangeError);
  });
});
