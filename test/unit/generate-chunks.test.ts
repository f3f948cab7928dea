/**
 * Generate's chunked prefill in process (generate() through the ModelScheduler over an engine
 * session of an in-process kvstore), across chunk sizes from one token to more than the prompt
 * and page sizes on and off the chunk boundaries: the greedy continuation of the tiny Llama-3
 * golden prompt is transformers' (golden.json) every time, and the session holds every prompt
 * token once.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { LocalRunner, localRetrieval } from "../../services/compute/generate/local.js";

const MODEL = join(import.meta.dirname, "..", "fixtures", "models", "tiny-llama3");
const golden = JSON.parse(readFileSync(join(MODEL, "golden.json"), "utf8")) as { prompt: number[]; continuation: number[] };
const runners: LocalRunner[] = [];

afterAll(async () => {
  for (const r of runners) await r.close();
});

describe("chunked prefill in process", () => {
  for (const [chunk, pageSize] of [
    [1, 16],
    [7, 8],
    [16, 16],
    [40, 32],
    [299, 32],
    [512, 16],
  ]) {
    it(`${chunk}-token chunks, page size ${pageSize}: the golden continuation`, async () => {
      const runner = new LocalRunner(MODEL, 2, chunk);
      runners.push(runner);
      const session = runner.open(localRetrieval({ pageSize }), 1024);
      const final = await runner.run(session, 1024, { prompt: golden.prompt, maxTokens: 12, sampling: { temperature: 0, topP: 0, topK: 0, seed: 0n }, stopTokenIds: [], stopStrings: [] });
      expect(final.tokens).toEqual(golden.continuation.slice(0, 12));
      expect(final.prefilledTokens).toBe(golden.prompt.length);
      expect(final.contextTokens).toBe(golden.prompt.length + 11);
      expect(runner.engine!.contextTokens(session)).toBe(golden.prompt.length + 11);
      await runner.close();
    });
  }
});
