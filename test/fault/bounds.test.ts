/**
 * Bounded resources with real processes: retrieval sizes capped before memory is sized, huge
 * text prompts refused before tokenizing, unbounded client strings never echoed in full (a
 * status too large for the trailer never arrives), undecodable requests answered with
 * INVALID_ARGUMENT, and requests (streamed messages included) that would decode into too many
 * objects refused with RESOURCE_EXHAUSTED before they are decoded.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Client, credentials, Metadata, status, type ServiceError } from "@grpc/grpc-js";
import { GenerateRequest, type GenerateResponse } from "../../proto/gen/freekv/v1/compute.js";
import { prng } from "../helpers/prng.js";
import { QUIET, computeClient, kvstoreClient, startTiers, unary, unaryError, type Tiers } from "../helpers/services.js";

let tiers: Tiers;
beforeAll(async () => {
  tiers = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...QUIET, FREEKV_THREADS: "2" } });
}, 60_000);
afterAll(() => tiers?.stop());

const varint = (v: number) => {
  const out: number[] = [];
  for (; v >= 0x80; v = Math.floor(v / 128)) out.push((v % 128) | 0x80);
  out.push(v);
  return Buffer.from(out);
};

const randomId = (n: number, rand: () => number) => Array.from({ length: n }, () => "abcdefghijklmnopqrstuvwxyz0123456789"[Math.floor(rand() * 36)]).join("");

describe("bounds", () => {
  it("retrieval sizes: capped at the session's capacity, refused above the absolute maximum, naming the field", async () => {
    const client = computeClient(tiers.compute.address);
    const rand = prng(0xb0b);
    for (const field of ["selectTokens", "sinkTokens", "windowTokens"] as const) {
      const max = 16 * (1 + Math.floor(rand() * 8));
      const { session } = await unary<{ session: { sessionId: string; retrieval: Record<string, number> } }>(client, "createSession", {
        kind: 2,
        geometry: { layers: 2, queryHeads: 4, kvHeads: 2, headDim: 32 },
        retrieval: { pageSize: 16, [field]: 1 << 20 },
        maxContextTokens: max,
      });
      expect(session.retrieval[field]).toBe(max);
      await unary(client, "closeSession", { sessionId: session.sessionId });
      const e = await unaryError(client, "createSession", { kind: 2, geometry: { layers: 2, queryHeads: 4, kvHeads: 2, headDim: 32 }, retrieval: { pageSize: 16, [field]: (1 << 20) + 16 }, maxContextTokens: 64 });
      expect(e.code).toBe(status.INVALID_ARGUMENT);
      expect(e.details).toMatch(new RegExp(`^retrieval\\.${field.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`)}:`));
    }
    client.close();
  });

  it("a session id of 128 KB gets a short INVALID_ARGUMENT from compute (as CreateSession) and a short NOT_FOUND from the kvstore", async () => {
    const rand = prng(0x1d);
    const id = randomId(128 << 10, rand);
    const client = computeClient(tiers.compute.address);
    const kv = kvstoreClient(tiers.kvstore.address);
    for (const [c, method] of [[client, "createSession"], [client, "getSession"], [client, "closeSession"]] as const) {
      const e = await unaryError(c, method, { sessionId: id });
      expect(e.code, method).toBe(status.INVALID_ARGUMENT);
      expect(e.details).toMatch(/^session_id: must match/);
    }
    const e = await unaryError(kv, "commitPages", { sessionId: id });
    expect(e.code).toBe(status.NOT_FOUND);
    expect(e.details.length).toBeLessThan(400);
    expect(e.details).toContain(id.slice(0, 64));
    client.close();
    kv.close();
  });

  it("a text prompt over the limit is refused before tokenizing", async () => {
    const client = computeClient(tiers.compute.address);
    const text = "lorem ipsum ".repeat((2 << 20) / 12 + 1);
    const t0 = Date.now();
    const err = await new Promise<ServiceError | undefined>((resolve) => {
      const call = client.generate(GenerateRequest.fromPartial({ prompt: { $case: "text", value: text }, maxTokens: 1 }), new Metadata(), { deadline: Date.now() + 30_000 });
      call.on("data", (_m: GenerateResponse) => undefined);
      call.on("error", resolve);
      call.on("end", () => resolve(undefined));
    });
    expect(err?.code).toBe(status.INVALID_ARGUMENT);
    expect(err?.details).toMatch(/^prompt\.text: \d+ bytes of text exceed the limit/);
    expect(Date.now() - t0).toBeLessThan(5000);
    // Chat prompts: too many messages, or many small ones whose framing takes them past the limit,
    // are refused before the template renders them.
    const chat = (messages: Array<{ role: string; content: string }>) =>
      new Promise<ServiceError | undefined>((resolve) => {
        const call = client.generate(GenerateRequest.fromPartial({ prompt: { $case: "chat", value: { messages } }, maxTokens: 1 }), new Metadata(), { deadline: Date.now() + 30_000 });
        call.on("data", (_m: GenerateResponse) => undefined);
        call.on("error", resolve);
        call.on("end", () => resolve(undefined));
      });
    const many = await chat(Array.from({ length: 10_000 }, () => ({ role: "u", content: "" })));
    expect(many?.code).toBe(status.INVALID_ARGUMENT);
    expect(many?.details).toBe("prompt.chat.messages: 10000 messages exceed the limit of 4096");
    const framed = await chat(Array.from({ length: 4000 }, () => ({ role: "user", content: "x".repeat(250) })));
    expect(framed?.code).toBe(status.INVALID_ARGUMENT);
    expect(framed?.details).toMatch(/^prompt\.chat\.messages: \d+ bytes of text \(32 a message for its framing\) exceed the limit of 1048576$/);
    client.close();
  });

  it("requests that do not decode get INVALID_ARGUMENT", async () => {
    const rand = prng(0xbad);
    const raw = new Client(tiers.compute.address, credentials.createInsecure());
    const rawKv = new Client(tiers.kvstore.address, credentials.createInsecure());
    // Truncated length-delimited fields, a truncated varint, an invalid wire type, after random valid-looking bytes.
    const tails = [[0x0a, 0x05, 0x61], [0x08], [0x0f], [0x12, 0xff, 0xff, 0xff, 0xff, 0x0f]];
    const call = (c: Client, path: string, body: Buffer) =>
      new Promise<ServiceError | undefined>((resolve) =>
        c.makeUnaryRequest(path, (b: Buffer) => b, (b: Buffer) => b, body, new Metadata(), { deadline: Date.now() + 10_000 }, (e) => resolve(e ?? undefined)),
      );
    for (const tail of tails) {
      const body = Buffer.from([...tail]);
      for (const [c, path] of [
        [raw, "/freekv.v1.ComputeService/CreateSession"],
        [raw, "/freekv.v1.ComputeService/GetSession"],
        [rawKv, "/freekv.v1.KvStoreService/CommitPages"],
      ] as const) {
        const e = await call(c, path, body);
        expect(e?.code, `${path} ${body.toString("hex")}`).toBe(status.INVALID_ARGUMENT);
      }
    }
    // Generate (server streaming) as well.
    const e = await new Promise<ServiceError | undefined>((resolve) => {
      const s = raw.makeServerStreamRequest("/freekv.v1.ComputeService/Generate", (b: Buffer) => b, (b: Buffer) => b, Buffer.from(tails[Math.floor(rand() * tails.length)]), new Metadata(), { deadline: Date.now() + 10_000 });
      s.on("data", () => undefined);
      s.on("error", resolve);
      s.on("end", () => resolve(undefined));
    });
    expect(e?.code).toBe(status.INVALID_ARGUMENT);
    // And a message of the Attention stream (bidirectional): the stream ends INVALID_ARGUMENT.
    const a = await new Promise<ServiceError | undefined>((resolve) => {
      const s = raw.makeBidiStreamRequest("/freekv.v1.ComputeService/Attention", (b: Buffer) => b, (b: Buffer) => b, new Metadata(), { deadline: Date.now() + 10_000 });
      s.on("data", () => undefined);
      s.on("error", resolve);
      s.on("end", () => resolve(undefined));
      s.write(Buffer.from(tails[Math.floor(rand() * tails.length)]));
    });
    expect(a?.code).toBe(status.INVALID_ARGUMENT);
    expect(a?.details).toMatch(/cannot be decoded/);
    raw.close();
    rawKv.close();
  });

  it("messages that would decode into too many objects or values are refused before they are decoded, streamed ones included", async () => {
    const raw = new Client(tiers.compute.address, credentials.createInsecure(), { "grpc.max_send_message_length": 256 << 20 });
    const rawKv = new Client(tiers.kvstore.address, credentials.createInsecure(), { "grpc.max_send_message_length": 64 << 20 });
    const attention = (body: Uint8Array) =>
      new Promise<ServiceError | undefined>((resolve) => {
        const s = raw.makeBidiStreamRequest("/freekv.v1.ComputeService/Attention", (b: Buffer) => b, (b: Buffer) => b, new Metadata(), { deadline: Date.now() + 30_000 });
        s.on("data", () => undefined);
        s.on("error", resolve);
        s.on("end", () => resolve(undefined));
        s.write(Buffer.from(body));
      });
    // 70,000 empty decode items (2 bytes each on the wire, an object each decoded).
    const items = Buffer.concat([Buffer.from([0x1a]), varint(70_000 * 2), Buffer.alloc(70_000 * 2).fill(Buffer.from([0x12, 0x00]))]);
    let e = await attention(items);
    expect(e?.code).toBe(status.RESOURCE_EXHAUSTED);
    expect(e?.details).toMatch(/more than 65536 embedded messages, over attention's limit/);
    // A tensor shape of 17M packed zeros (1 byte each).
    const n = (1 << 24) + 16;
    const shape = Buffer.concat([Buffer.from([0x12]), varint(n), Buffer.alloc(n)]);
    const tensor = Buffer.concat([Buffer.from([0x12]), varint(shape.length), shape]);
    const item = Buffer.concat([Buffer.from([0x12]), varint(tensor.length), tensor]);
    e = await attention(Buffer.concat([Buffer.from([0x1a]), varint(item.length), item]));
    expect(e?.code).toBe(status.RESOURCE_EXHAUSTED);
    expect(e?.details).toMatch(/more than 16777216 fields and repeated values/);
    // The kvstore's unary CommitPages with 70,000 empty layer entries.
    const layers = Buffer.alloc(70_000 * 2).fill(Buffer.from([0x42, 0x00]));
    const ek = await new Promise<ServiceError | undefined>((resolve) =>
      rawKv.makeUnaryRequest("/freekv.v1.KvStoreService/CommitPages", (b: Buffer) => b, (b: Buffer) => b, layers, new Metadata(), { deadline: Date.now() + 30_000 }, (x) => resolve(x ?? undefined)),
    );
    expect(ek?.code).toBe(status.RESOURCE_EXHAUSTED);
    expect(ek?.details).toMatch(/more than 65536 embedded messages/);
    // Both still serve.
    const c = computeClient(tiers.compute.address);
    expect((await unaryError(c, "getSession", { sessionId: "nobody-here" })).code).toBe(status.NOT_FOUND);
    c.close();
    const kv = kvstoreClient(tiers.kvstore.address);
    expect((await unaryError(kv, "commitPages", { sessionId: "nobody-here" })).code).toBe(status.NOT_FOUND);
    kv.close();
    raw.close();
    rawKv.close();
  }, 60_000);

  it("a Generate request larger than a prompt of the largest context is refused before it is decoded", async () => {
    // The default FREEKV_MAX_CONTEXT_LIMIT (1M tokens) allows 8 bytes a token plus 1 MiB: 9 MiB.
    const rand = prng(0x5e1f);
    const ids = Array.from({ length: 4_200_000 }, () => 16384 + Math.floor(rand() * 2_000_000));
    const body = Buffer.from(GenerateRequest.encode(GenerateRequest.fromPartial({ prompt: { $case: "tokens", value: { ids } }, maxTokens: 1 })).finish());
    expect(body.length).toBeGreaterThan(9 << 20);
    const raw = new Client(tiers.compute.address, credentials.createInsecure(), { "grpc.max_send_message_length": 64 << 20 });
    const started = performance.now();
    const e = await new Promise<ServiceError | undefined>((resolve) => {
      const s = raw.makeServerStreamRequest("/freekv.v1.ComputeService/Generate", (b: Buffer) => b, (b: Buffer) => b, body, new Metadata(), { deadline: Date.now() + 20_000 });
      s.on("data", () => undefined);
      s.on("error", resolve);
      s.on("end", () => resolve(undefined));
    });
    expect(e?.code).toBe(status.RESOURCE_EXHAUSTED);
    expect(e?.details).toContain(`${body.length} bytes, over generate's limit of ${8 * (1 << 20) + (1 << 20)} bytes`);
    expect(performance.now() - started).toBeLessThan(10_000);
    // The process still serves: a small request is answered as usual.
    const c = computeClient(tiers.compute.address);
    const err = await unaryError(c, "getSession", { sessionId: randomId(12, rand) });
    expect(err.code).toBe(status.NOT_FOUND);
    c.close();
    raw.close();
  }, 60_000);
});
