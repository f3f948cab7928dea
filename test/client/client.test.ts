/**
 * @freekv/client (packages/client): against the real services (built-in model), its Generate
 * helpers give exactly what the raw generated stub gives for the same requests; against the real
 * services with a model that never stops (tiny Qwen2 without EOS), a consumer that stops pulling
 * holds the server back until the server ends the stalled call; against fake compute servers in
 * this process, it retries UNAVAILABLE with backoff only while nothing was delivered, follows
 * `x-freekv-session-owner` to the session's pod and remembers it (forgetting sessions answered
 * NOT_FOUND, and the least recently used past its bound), reads a stream only as it is consumed
 * and hands out every message it received ahead of an error, honours deadlines and cancellation (an already
 * aborted signal included).
 */
import { rmSync } from "node:fs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { InterceptingCall, Metadata, Server, ServerCredentials, status, type Interceptor, type sendUnaryData, type ServerUnaryCall, type ServerWritableStream, type ServiceError, type UntypedServiceImplementation } from "@grpc/grpc-js";
import { backoffMs, FreeKvClient, SESSION_OWNER_KEY, STREAM_BUFFER_MESSAGES, type GenerateEvent } from "../../packages/client/src/index.js";
import { ComputeServiceService, CreateSessionRequest, CreateSessionResponse, GenerateRequest, GenerateResponse, GetSessionRequest, GetSessionResponse } from "../../proto/gen/freekv/v1/compute.js";
import { prng } from "../helpers/prng.js";
import { QUIET, computeClient, fetchMetrics, metricValue, startTiers, type Tiers } from "../helpers/services.js";
import { tinyModelWithoutEos } from "../helpers/tiny-model.js";

const seed = Number(process.env.FREEKV_TEST_SEED) || (Date.now() ^ (process.pid << 12)) >>> 0;

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

/** A client interceptor that counts the messages gRPC hands up from the transport (what the client has read). */
function countingReads(): { interceptor: Interceptor; readonly count: number } {
  let count = 0;
  const interceptor: Interceptor = (options, nextCall) =>
    new InterceptingCall(nextCall(options), {
      start: (metadata, listener, next) =>
        next(metadata, {
          onReceiveMessage: (message, nextMessage) => {
            count++;
            nextMessage(message);
          },
        }),
    });
  return {
    interceptor,
    get count() {
      return count;
    },
  };
}

async function until(what: string, ok: () => Promise<boolean> | boolean, timeoutMs = 30_000): Promise<void> {
  const t0 = Date.now();
  while (!(await ok())) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe(`@freekv/client flow control against the services (tiny model without EOS, seed ${seed})`, () => {
  const STALL_MS = 400;
  let tiers: Tiers;
  let modelDir: string;
  beforeAll(async () => {
    modelDir = tinyModelWithoutEos("freekv-client-model-");
    tiers = await startTiers({
      kvstoreEnv: QUIET,
      computeEnv: { ...QUIET, FREEKV_MODEL: modelDir, FREEKV_THREADS: "1", FREEKV_WRITE_STALL_MS: String(STALL_MS), FREEKV_MAX_CONTEXT_TOKENS: "16384" },
    });
  }, 120_000);
  afterAll(async () => {
    await tiers?.stop();
    if (modelDir) rmSync(modelDir, { recursive: true, force: true });
  });

  it("a consumer that stops pulling holds the server back: the client reads a bounded number of messages ahead, and the server ends the stalled call", async () => {
    const rand = prng(seed);
    // Far more tokens than the transport's windows hold (a chunk message is some 20-40 bytes).
    const maxTokens = 9000 + Math.floor(rand() * 3000);
    const ids = Array.from({ length: 8 + Math.floor(rand() * 24) }, () => Math.floor(rand() * 320));
    const reads = countingReads();
    const client = new FreeKvClient(tiers.compute.address, { defaultDeadlineMs: 60_000, channelOptions: { interceptors: [reads.interceptor] } });
    const finished = async (finish: string) => metricValue(await fetchMetrics(tiers.compute.metricsPort), "freekv_generate_requests_total", `finish="${finish}"`) ?? 0;
    const [stalledBefore, lengthBefore] = [await finished("write_stalled"), await finished("length")];
    const it = client.generate({ prompt: { $case: "tokens", value: { ids } }, maxTokens, sampling: { temperature: 0, topP: 0, topK: 0, seed: 0 } })[Symbol.asyncIterator]();
    try {
      const events: GenerateEvent[] = [];
      const first = await it.next();
      expect(first.done).toBe(false);
      events.push(first.value as GenerateEvent);
      // The consumer stops pulling: the call ends at the server, stalled, not run to max_tokens.
      await until("the call to end at the server", async () => (await finished("write_stalled")) > stalledBefore || (await finished("length")) > lengthBefore);
      const readWhileStopped = reads.count;
      expect(await finished("write_stalled")).toBe(stalledBefore + 1);
      expect(await finished("length")).toBe(lengthBefore);
      // What the client read meanwhile: its own buffer and gRPC's read-ahead, not the stream.
      expect(readWhileStopped).toBeLessThanOrEqual(4 * STREAM_BUFFER_MESSAGES);
      // Pulling again: every message the client received, then the status naming the limit.
      let error: ServiceError | undefined;
      try {
        for (let r = await it.next(); !r.done; r = await it.next()) events.push(r.value);
      } catch (e) {
        error = e as ServiceError;
      }
      expect(error?.code).toBe(status.DEADLINE_EXCEEDED);
      expect(error?.details).toMatch(/FREEKV_WRITE_STALL_MS/);
      const tokens = events.flatMap((e) => (e.type === "chunk" ? e.tokenIds : []));
      expect(events.length).toBe(reads.count);
      expect(tokens.length).toBeGreaterThan(readWhileStopped);
      expect(tokens.length).toBeLessThan(maxTokens);
      expect(events.some((e) => e.type === "final")).toBe(false);
    } finally {
      await it.return(undefined);
      client.close();
    }
  }, 60_000);
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

  it("reads a stream as it is consumed: every message the client received comes before the error; an abort ends it at once with its reason", async () => {
    const rand = prng(seed + 1);
    // Many more messages than the client reads ahead, then an error.
    const n = 4 * STREAM_BUFFER_MESSAGES + Math.floor(rand() * 200);
    const texts = Array.from({ length: n }, () => Math.floor(rand() * 1e6).toString(36));
    const failing = await fakeCompute((call) => {
      texts.forEach((t, i) => call.write(chunk([i], t)));
      call.emit("error", { code: status.INTERNAL, details: "failed after its messages" });
    });
    const reads = countingReads();
    const client = new FreeKvClient(failing.address, { channelOptions: { interceptors: [reads.interceptor] } });
    const seen: string[] = [];
    let error: ServiceError | undefined;
    try {
      // A consumer that takes one event and waits: the client pauses the call with messages
      // buffered, and the error comes while they are. (gRPC lets an error status overtake the
      // messages still in the transport, so the client receives only some of the n.)
      for await (const e of client.generate({ prompt: { $case: "text", value: "x" }, maxTokens: n })) {
        if (e.type === "chunk") seen.push(e.text);
        if (seen.length === 1) await new Promise((r) => setTimeout(r, 200));
      }
    } catch (e) {
      error = e as ServiceError;
    } finally {
      client.close();
      await failing.stop();
    }
    expect(error?.code).toBe(status.INTERNAL);
    expect(reads.count).toBeGreaterThan(1);
    expect(seen).toEqual(texts.slice(0, reads.count));

    // A stream that keeps sending: the caller aborts with events buffered, and gets its reason next.
    let cancelled = false;
    const endless = await fakeCompute((call) => {
      call.on("cancelled", () => (cancelled = true));
      for (let i = 0; i < n; i++) call.write(chunk([i], "t"));
    });
    const c2 = new FreeKvClient(endless.address);
    const ac = new AbortController();
    const reason = new Error(`caller gave up after ${Math.floor(rand() * 1e9)}`);
    const it = c2.generate({ prompt: { $case: "text", value: "x" }, maxTokens: n }, { signal: ac.signal })[Symbol.asyncIterator]();
    try {
      expect((await it.next()).done).toBe(false);
      await new Promise((r) => setTimeout(r, 200)); // the client reads ahead meanwhile
      ac.abort(reason);
      await expect(it.next()).rejects.toBe(reason);
      await until("the server to see the call cancelled", () => cancelled, 3000);
    } finally {
      c2.close();
      await endless.stop();
    }
  });

  it("an already aborted signal starts no Generate call and rejects with its reason", async () => {
    const server = await fakeCompute(streamTwo);
    const client = new FreeKvClient(server.address);
    const rand = prng(seed + 2);
    try {
      const ac = new AbortController();
      const reason = new Error(`aborted before the call ${Math.floor(rand() * 1e9)}`);
      ac.abort(reason);
      await expect(client.generateText({ prompt: { $case: "text", value: "x" }, maxTokens: 2 }, { signal: ac.signal })).rejects.toBe(reason);
      const it = client.generate({ sessionId: `s-${Math.floor(rand() * 1e9)}`, prompt: { $case: "text", value: "y" }, maxTokens: 2 }, { signal: ac.signal })[Symbol.asyncIterator]();
      await expect(it.next()).rejects.toBe(reason);
      // The same client with no signal does call the server.
      expect((await client.generateText({ prompt: { $case: "text", value: "z" }, maxTokens: 2 })).text).toBe("ab");
      expect(server.calls).toBe(1);
    } finally {
      client.close();
      await server.stop();
    }
  });

  it("forgets a session answered NOT_FOUND, and the least recently used sessions past maxRememberedSessions", async () => {
    const rand = prng(seed + 3);
    const gone = new Set<string>();
    const sessionOf = (id: string) => ({ session: { sessionId: id } });
    const notFound = (id: string) => ({ code: status.NOT_FOUND, details: `session ${id} not found` });
    const owner = await fakeCompute(
      (call) => (gone.has(call.request.sessionId) ? call.emit("error", notFound(call.request.sessionId)) : streamTwo(call)),
      0,
      {
        createSession: (call: ServerUnaryCall<CreateSessionRequest, CreateSessionResponse>, cb: sendUnaryData<CreateSessionResponse>) => cb(null, CreateSessionResponse.fromPartial(sessionOf(call.request.sessionId))),
        getSession: (call: ServerUnaryCall<GetSessionRequest, GetSessionResponse>, cb: sendUnaryData<GetSessionResponse>) =>
          gone.has(call.request.sessionId) ? cb(notFound(call.request.sessionId)) : cb(null, GetSessionResponse.fromPartial(sessionOf(call.request.sessionId))),
      },
    );
    // The configured address holds no session: it redirects every call to the owner.
    const redirect = (_: unknown, cb: (e: Partial<ServiceError>) => void) => {
      const md = new Metadata();
      md.set(SESSION_OWNER_KEY, owner.address);
      cb({ code: status.FAILED_PRECONDITION, details: "session held by another pod", metadata: md });
    };
    const front = await fakeCompute(
      (call) => {
        const md = new Metadata();
        md.set(SESSION_OWNER_KEY, owner.address);
        call.emit("error", { code: status.FAILED_PRECONDITION, details: "session held by another pod", metadata: md });
      },
      0,
      { createSession: redirect, getSession: redirect },
    );
    const bound = 4 + Math.floor(rand() * 8);
    const client = new FreeKvClient(front.address, { maxRememberedSessions: bound });
    const newId = () => `s-${Math.floor(rand() * 1e12).toString(36)}`;
    try {
      // Expired at the owner (or closed by another client): a unary call and a Generate each forget theirs.
      const [a, b] = [newId(), newId()];
      await client.createSession({ sessionId: a, kind: 1 });
      await client.generateText({ sessionId: b, prompt: { $case: "text", value: "x" }, maxTokens: 2 });
      expect([client.addressFor(a), client.addressFor(b)]).toEqual([owner.address, owner.address]);
      gone.add(a).add(b);
      await expect(client.getSession({ sessionId: a })).rejects.toMatchObject({ code: status.NOT_FOUND });
      await expect(client.generateText({ sessionId: b, prompt: { $case: "text", value: "x" }, maxTokens: 2 })).rejects.toMatchObject({ code: status.NOT_FOUND });
      expect([client.addressFor(a), client.addressFor(b)]).toEqual([front.address, front.address]);

      // `bound` sessions fill the map; the oldest is used again; `extra` more push out the next oldest.
      const ids = Array.from({ length: bound }, newId);
      for (const id of ids) await client.createSession({ sessionId: id, kind: 1 });
      await client.getSession({ sessionId: ids[0] });
      const extra = 1 + Math.floor(rand() * (bound - 2));
      const more = Array.from({ length: extra }, newId);
      for (const id of more) await client.createSession({ sessionId: id, kind: 1 });
      const evicted = ids.slice(1, 1 + extra);
      const kept = [ids[0], ...ids.slice(1 + extra), ...more];
      expect(kept.length).toBe(bound);
      expect(evicted.map((id) => client.addressFor(id))).toEqual(evicted.map(() => front.address));
      expect(kept.map((id) => client.addressFor(id))).toEqual(kept.map(() => owner.address));
    } finally {
      client.close();
      await owner.stop();
      await front.stop();
    }
    expect(() => new FreeKvClient("127.0.0.1:1", { maxRememberedSessions: -1 })).toThrow(RangeError);
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
