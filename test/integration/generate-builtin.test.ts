/**
 * Generate over gRPC with the built-in model (made here by scripts/make-builtin-model.mjs):
 * text and chat prompts through its tokenizer and chat template, streamed text that adds up to
 * the decoded tokens, stop strings, and a long prompt (well past the budget) that generates with
 * FreeKV selection and recall from the kvstore's segments active.
 */
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Metadata, type ClientReadableStream } from "@grpc/grpc-js";
import { GenerateRequest, type GenerateFinal, type GenerateResponse } from "../../proto/gen/freekv/v1/compute.js";
import { readModelFolder } from "../../services/compute/model/loader.js";
import type { TextCodec } from "../../services/compute/model/tokenizer.js";
import { QUIET, computeClient, startTiers, type Tiers } from "../helpers/services.js";
import { prng } from "../helpers/prng.js";

let tiers: Tiers;
let client: ReturnType<typeof computeClient>;
let codec: TextCodec;
const dir = mkdtempSync(join(tmpdir(), "freekv-builtin-"));

beforeAll(async () => {
  execFileSync(process.execPath, [join(import.meta.dirname, "..", "..", "scripts", "make-builtin-model.mjs"), "--out", dir]);
  codec = readModelFolder(dir).codec!;
  tiers = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...QUIET, FREEKV_MODEL: dir, FREEKV_THREADS: "2" } });
  client = computeClient(tiers.compute.address);
});

afterAll(async () => {
  client?.close();
  await tiers?.stop();
  rmSync(dir, { recursive: true, force: true });
});

interface Result {
  tokens: number[];
  text: string;
  final?: GenerateFinal;
}

function run(req: Partial<GenerateRequest>, deadlineMs = 90_000): Promise<Result> {
  const stream: ClientReadableStream<GenerateResponse> = client.generate(GenerateRequest.fromPartial(req), new Metadata(), { deadline: Date.now() + deadlineMs });
  const r: Result = { tokens: [], text: "" };
  return new Promise((resolve, reject) => {
    stream.on("data", (m: GenerateResponse) => {
      if (m.event?.$case === "chunk") {
        r.tokens.push(...m.event.value.tokenIds);
        r.text += m.event.value.text;
      } else if (m.event?.$case === "final") r.final = m.event.value;
    });
    stream.on("error", reject);
    stream.on("end", () => resolve(r));
  });
}

describe("Generate with the built-in model", () => {
  it("takes a text prompt and streams text that adds up to the decoded tokens", async () => {
    const r = await run({ prompt: { $case: "text", value: "The quick brown fox" }, maxTokens: 24, sampling: { temperature: 0.9, topP: 0.95, topK: 50, seed: 7 } });
    expect(r.final?.usage?.promptTokens).toBe(codec.encode("The quick brown fox", true).length);
    const stopped = r.final?.finishReason === 2; // the model's EOS ends it early, and is not text
    expect(r.text).toBe(codec.decode(stopped ? r.tokens.slice(0, -1) : r.tokens));
    // Same seed, same answer.
    const again = await run({ prompt: { $case: "text", value: "The quick brown fox" }, maxTokens: 24, sampling: { temperature: 0.9, topP: 0.95, topK: 50, seed: 7 } });
    expect(again.tokens).toEqual(r.tokens);
  });

  it("renders chat messages with the model's template", async () => {
    const messages = [{ role: "user", content: "Hello, how are you?" }];
    const r = await run({ prompt: { $case: "chat", value: { messages } }, maxTokens: 4 });
    expect(r.final?.usage?.promptTokens).toBe(codec.encodeChat(messages).length);
  });

  it("continues a chat on a session: the next turn is rendered without a second BOS", async () => {
    await new Promise<void>((resolve, reject) =>
      client.createSession({ sessionId: "chat", kind: 1, retrieval: undefined, maxContextTokens: 4096, geometry: undefined }, (e) => (e ? reject(e) : resolve())),
    );
    const turn1 = [{ role: "user", content: "Hello" }];
    const turn2 = [{ role: "user", content: "And then?" }];
    const a = await run({ sessionId: "chat", prompt: { $case: "chat", value: { messages: turn1 } }, maxTokens: 3 });
    const b = await run({ sessionId: "chat", prompt: { $case: "chat", value: { messages: turn2 } }, maxTokens: 3 });
    const second = codec.encodeChat(turn2, true);
    expect(second).not.toContain(codec.encodeChat(turn1)[0]); // no BOS id in the continuation
    expect(b.final?.usage?.promptTokens).toBe(second.length);
    expect(b.final?.usage?.contextTokens).toBe(a.final!.usage!.contextTokens + 1 + second.length + b.tokens.length - 1);
    await new Promise<void>((resolve, reject) => client.closeSession({ sessionId: "chat" }, (e) => (e ? reject(e) : resolve())));
  });

  it("stops at a stop string and does not stream it", async () => {
    const free = await run({ prompt: { $case: "text", value: "Hello world" }, maxTokens: 30, stopTokenIds: [] });
    const full = free.text;
    expect(full.length).toBeGreaterThan(6);
    const stop = full.slice(3, 6); // a piece of what greedy decoding writes anyway
    const r = await run({ prompt: { $case: "text", value: "Hello world" }, maxTokens: 30, stopStrings: [stop] });
    expect(r.final?.finishReason).toBe(3); // STOP_STRING
    expect(r.text).toBe(full.slice(0, full.indexOf(stop)));
  });

  it("ends at the model's EOS, and with ignore_eos runs past it to max_tokens", async () => {
    // Greedy from random prompts: the built-in model's output reaches one of its EOS ids within
    // 200 tokens from about a third of them. The first prompt that does is the case.
    const seed = Number(process.env.FREEKV_TEST_SEED) || Date.now() >>> 0;
    const rand = prng(seed);
    const eos = readModelFolder(dir).spec.eosTokenIds;
    const greedy = { temperature: 0, topP: 0, topK: 0, seed: 0 };
    let stopped: { ids: number[]; r: Result } | undefined;
    for (let i = 0; i < 60 && !stopped; i++) {
      const ids = Array.from({ length: 6 }, () => Math.floor(rand() * 500));
      const r = await run({ prompt: { $case: "tokens", value: { ids } }, maxTokens: 200, sampling: greedy });
      if (r.final?.finishReason === 2) stopped = { ids, r };
    }
    expect(stopped, "no random prompt reached EOS within 200 tokens").toBeDefined();
    const { ids, r } = stopped!;
    // The EOS id ends the answer as its last token (streamed and counted, as other servers do).
    const n = r.tokens.length;
    expect(r.final?.usage?.completionTokens).toBe(n);
    expect(n).toBeLessThan(200);
    expect(eos, `seed ${seed}, prompt ${ids.join(",")}`).toContain(r.tokens[n - 1]);
    expect(r.tokens.slice(0, n - 1).some((t) => eos.includes(t))).toBe(false);
    // With ignore_eos the same answer runs on past it.
    const through = await run({ prompt: { $case: "tokens", value: { ids } }, maxTokens: n + 8, sampling: greedy, ignoreEos: true });
    expect(through.final?.finishReason).toBe(1); // LENGTH
    expect(through.tokens).toHaveLength(n + 8);
    expect(through.tokens.slice(0, n)).toEqual(r.tokens);
  });

  it("generates after a long prompt with FreeKV selection and recall active", async () => {
    const prompt = Array.from({ length: 2400 }, (_, i) => (i * 7919 + 13) % 500);
    const r = await run({
      prompt: { $case: "tokens", value: { ids: prompt } },
      maxTokens: 24,
      stopTokenIds: [],
      retrieval: { pageSize: 32, sinkTokens: 64, windowTokens: 64, selectTokens: 128, tau: 0.9, tauSet: true, summary: 0, combine: 0, mode: 0, recall: 0, denseLayers: [] },
    });
    const st = r.final!.stats!;
    console.log(
      `long prompt: ${prompt.length} tokens + ${r.tokens.length} generated; prefill ${r.final!.usage!.prefillMs.toFixed(0)} ms, ` +
        `decode ${r.final!.usage!.decodeMs.toFixed(0)} ms; offloaded ${st.pagesOffloaded} pages, selected ${st.pagesSelected}, ` +
        `recalled ${st.pagesRecalled} (${st.recallBytes} B), correction rate ${st.correctionRate.toFixed(2)}`,
    );
    expect(st.pagesOffloaded).toBeGreaterThan(0);
    expect(st.selections).toBeGreaterThan(0);
    expect(st.recallBytes).toBeGreaterThan(0);
  });
});
