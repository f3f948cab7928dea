/**
 * SIGTERM with the OpenAI front on: /health and new requests get 503 at once, a completion
 * streaming over HTTP is served to its end within the grace period (the drain waits for it as for
 * a gRPC call), then the process exits 0.
 */
import { afterEach, describe, expect, it } from "vitest";
import OpenAI, { APIError } from "openai";
import { QUIET, startTiers, type Tiers } from "../helpers/services.js";

let tiers: Tiers | undefined;

afterEach(async () => {
  await tiers?.stop("SIGTERM").catch(() => undefined);
  tiers = undefined;
});

describe("SIGTERM with the OpenAI front", () => {
  it("refuses new requests with 503 and finishes the stream in flight before exiting 0", async () => {
    tiers = await startTiers({
      kvstoreEnv: QUIET,
      computeEnv: { ...QUIET, FREEKV_THREADS: "2", FREEKV_MAX_CONTEXT_TOKENS: "4096", FREEKV_OPENAI_PORT: "0", FREEKV_SHUTDOWN_GRACE_MS: "60000" },
    });
    const base = `http://127.0.0.1:${tiers.compute.openaiPort}`;
    const openai = new OpenAI({ apiKey: "unused", baseURL: `${base}/v1`, maxRetries: 0 });
    // Greedy, this prompt runs past 1000 tokens without the model's EOS (about 3 s here).
    const MAX = 1000;
    const stream = await openai.completions.create({ model: "builtin", prompt: "Once upon a time", max_tokens: MAX, temperature: 0, stream: true, stream_options: { include_usage: true } });
    const it = stream[Symbol.asyncIterator]();
    expect((await it.next()).done).toBe(false);
    const t0 = Date.now();
    tiers.compute.child.kill("SIGTERM");
    // The front stops taking work as soon as the drain starts.
    for (;;) {
      const h = await fetch(`${base}/health`);
      if (h.status === 503) break;
      expect(Date.now() - t0, "/health should turn 503").toBeLessThan(5000);
      await new Promise((r) => setTimeout(r, 10));
    }
    const late = await openai.completions.create({ model: "builtin", prompt: "x", max_tokens: 2 }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(late).toBeInstanceOf(APIError);
    expect((late as APIError).status).toBe(503);
    expect((late as APIError).headers?.get("retry-after")).toBe("1");
    // The stream in flight runs to its end.
    let finish: string | null = null;
    let usage: OpenAI.CompletionUsage | null | undefined;
    for (;;) {
      const r = await it.next();
      if (r.done) break;
      for (const c of r.value.choices) finish = c.finish_reason ?? finish;
      usage = r.value.usage ?? usage;
    }
    expect(finish).toBe("length");
    expect(usage?.completion_tokens).toBe(MAX);
    expect(await tiers.compute.exited).toEqual({ code: 0, signal: null });
  });
});
