/**
 * A named session's first Generate starts like a stateless one: CreateSession then Generate
 * tokenizes the prompt with BOS (same prompt token count) and, greedy, gives the same tokens as a
 * stateless Generate of the same prompt; only a later turn, whose cache already holds tokens, is
 * encoded without BOS. Both tiers as processes, the built-in model (text and chat prompts), fresh
 * random prompts each run.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Metadata, type ClientReadableStream } from "@grpc/grpc-js";
import { GenerateRequest, type GenerateFinal, type GenerateResponse } from "../../proto/gen/freekv/v1/compute.js";
import { builtinModelDir, readModelFolder } from "../../services/compute/model/loader.js";
import type { TextCodec } from "../../services/compute/model/tokenizer.js";
import { QUIET, computeClient, startTiers, unary, type Tiers } from "../helpers/services.js";
import { prng } from "../helpers/prng.js";

let tiers: Tiers;
let client: ReturnType<typeof computeClient>;
let codec: TextCodec;
const seed = (Date.now() ^ (process.pid << 8)) >>> 0;
const rand = prng(seed);

beforeAll(async () => {
  codec = readModelFolder(builtinModelDir()).codec!;
  tiers = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...QUIET, FREEKV_THREADS: "2" } });
  client = computeClient(tiers.compute.address);
});

afterAll(async () => {
  client?.close();
  await tiers?.stop();
});

interface Result {
  tokens: number[];
  final?: GenerateFinal;
}

function run(req: Partial<GenerateRequest>, deadlineMs = 60_000): Promise<Result> {
  const stream: ClientReadableStream<GenerateResponse> = client.generate(GenerateRequest.fromPartial(req), new Metadata(), { deadline: Date.now() + deadlineMs });
  const r: Result = { tokens: [] };
  return new Promise((resolve, reject) => {
    stream.on("data", (m: GenerateResponse) => {
      if (m.event?.$case === "chunk") r.tokens.push(...m.event.value.tokenIds);
      else if (m.event?.$case === "final") r.final = m.event.value;
    });
    stream.on("error", reject);
    stream.on("end", () => resolve(r));
  });
}

const WORDS = ["Hello", "the", "river", "quiet", "morning", "seven", "blue", "stones", "under", "a", "bridge", "we", "count", "lights"];
function randomText(): string {
  const n = 1 + Math.floor(rand() * 8);
  return Array.from({ length: n }, () => WORDS[Math.floor(rand() * WORDS.length)]).join(" ");
}

const greedy = { temperature: 0, topP: 0, topK: 0, seed: 0 };

describe(`a named session's first Generate (seed ${seed})`, () => {
  it("has BOS, so its prompt and greedy output equal a stateless Generate's", async () => {
    const texts = ["Hello", randomText(), randomText()];
    for (const [i, text] of texts.entries()) {
      const maxTokens = 4 + Math.floor(rand() * 12);
      const prompt = { $case: "text" as const, value: text };
      const stateless = await run({ prompt, maxTokens, sampling: greedy });
      const id = `bos-${seed}-${i}`;
      await unary(client, "createSession", { sessionId: id, kind: 1 });
      try {
        const named = await run({ sessionId: id, prompt, maxTokens, sampling: greedy });
        expect(codec.encode(text, true).length, "the tokenizer adds BOS").toBeGreaterThan(codec.encode(text, false).length);
        expect(stateless.final?.usage?.promptTokens).toBe(codec.encode(text, true).length);
        expect(named.final?.usage?.promptTokens, text).toBe(stateless.final?.usage?.promptTokens);
        expect(named.tokens, text).toEqual(stateless.tokens);
        // The next turn continues the cache: no BOS in the middle of the conversation.
        const more = randomText();
        const second = await run({ sessionId: id, prompt: { $case: "text", value: more }, maxTokens: 2, sampling: greedy });
        expect(second.final?.usage?.promptTokens, more).toBe(codec.encode(more, false).length);
      } finally {
        await unary(client, "closeSession", { sessionId: id });
      }
    }
  });

  it("renders a chat prompt with the BOS text in an empty named session, without it after", async () => {
    const messages = [{ role: "user", content: randomText() }];
    const maxTokens = 6;
    const stateless = await run({ prompt: { $case: "chat", value: { messages } }, maxTokens, sampling: greedy });
    const id = `bos-chat-${seed}`;
    await unary(client, "createSession", { sessionId: id, kind: 1 });
    try {
      const named = await run({ sessionId: id, prompt: { $case: "chat", value: { messages } }, maxTokens, sampling: greedy });
      expect(named.final?.usage?.promptTokens).toBe(stateless.final?.usage?.promptTokens);
      expect(named.tokens).toEqual(stateless.tokens);
      const next = [{ role: "user", content: randomText() }];
      const second = await run({ sessionId: id, prompt: { $case: "chat", value: { messages: next } }, maxTokens: 2, sampling: greedy });
      expect(second.final?.usage?.promptTokens).toBe(codec.encodeChat(next, true).length);
    } finally {
      await unary(client, "closeSession", { sessionId: id });
    }
  });
});
