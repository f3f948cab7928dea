/** OpenAI request bodies read into Generate requests, gRPC statuses mapped to OpenAI's errors, and the front's settings. */
import { status } from "@grpc/grpc-js";
import { describe, expect, it } from "vitest";
import { parseConfig } from "../../services/common/config.js";
import { computeConfigSchema } from "../../services/compute/config.js";
import { fromGrpcStatus, HttpError } from "../../services/compute/openai/errors.js";
import { neverFits, toStatus } from "../../services/common/errors.js";
import { createLogger } from "../../services/common/log.js";
import { COMPLETIONS_DEFAULT_MAX_TOKENS, readRequest } from "../../services/compute/openai/requests.js";

/** The 400 a body gets: its param and message. */
function refused(endpoint: "completions" | "chat", body: unknown): HttpError {
  try {
    readRequest(endpoint, body, 1000);
  } catch (e) {
    expect(e).toBeInstanceOf(HttpError);
    expect((e as HttpError).status).toBe(400);
    return e as HttpError;
  }
  throw new Error(`${String(body).slice(0, 200)} was accepted`);
}

describe("OpenAI request bodies", () => {
  it("a value too deeply nested to show, or too long, is a short 400, not a stack overflow or an echo", () => {
    let deep: unknown = 1;
    for (let i = 0; i < 200_000; i++) deep = [deep];
    const e = refused("completions", { prompt: "x", n: deep });
    expect(e.message).toMatch(/too deeply nested to show/);
    const long = "x".repeat(7 << 20);
    const e2 = refused("completions", { prompt: "x", max_tokens: long });
    expect(e2.message.length).toBeLessThan(400);
    expect(e2.message).toMatch(new RegExp(`\\(${long.length + 2} characters\\)`));
  });

  it("maps a completion's fields, with OpenAI's defaults where they are absent", () => {
    const r = readRequest("completions", { model: "m", prompt: "hi", max_tokens: 7, temperature: 0.5, top_p: 0.9, seed: 11, stop: "\n", stream: true, stream_options: { include_usage: true } }, 1000);
    expect(r).toMatchObject({ model: "m", prompt: { $case: "text", value: "hi" }, maxTokens: 7, stopStrings: ["\n"], stream: true, includeUsage: true });
    expect(r.sampling).toEqual({ temperature: 0.5, topP: 0.9, topK: 0, seed: 11 });
    const d = readRequest("completions", { prompt: [[1, 2, 3]] }, 1000);
    expect(d).toMatchObject({ model: undefined, prompt: { $case: "tokens", value: { ids: [1, 2, 3] } }, maxTokens: COMPLETIONS_DEFAULT_MAX_TOKENS, stream: false, includeUsage: false });
    // temperature 1 and top_p 1 (off) as OpenAI's; top_p 0 keeps the most likely token only.
    expect(d.sampling).toEqual({ temperature: 1, topP: 0, topK: 0, seed: 0 });
    expect(readRequest("completions", { prompt: "x", top_p: 0, temperature: 0.7 }, 1000).sampling.temperature).toBe(0);
    // vLLM's ignore_eos, off unless given.
    expect(d.ignoreEos).toBe(false);
    expect(readRequest("completions", { prompt: "x", ignore_eos: true }, 1000).ignoreEos).toBe(true);
    expect(readRequest("chat", { messages: [{ role: "user", content: "x" }], ignore_eos: false }, 1000).ignoreEos).toBe(false);
  });

  it("maps a chat's messages and max_completion_tokens; its default max_tokens is the given one", () => {
    const r = readRequest("chat", { messages: [{ role: "system", content: "s" }, { role: "user", content: [{ type: "text", text: "a" }, { type: "text", text: "b" }] }, { role: "assistant", content: null }], max_tokens: 3, max_completion_tokens: 5 }, 1000);
    expect(r.prompt).toEqual({ $case: "chat", value: { messages: [{ role: "system", content: "s" }, { role: "user", content: "ab" }, { role: "assistant", content: "" }] } });
    expect(r.maxTokens).toBe(5);
    expect(readRequest("chat", { messages: [{ role: "user", content: "x" }] }, 1234).maxTokens).toBe(1234);
    expect(readRequest("chat", { messages: [{ role: "user", content: "x" }], stop: ["a", "", "b"], session_id: "s" }, 1000)).toMatchObject({ stopStrings: ["a", "b"], sessionId: "s" });
  });

  it("refuses what it does not serve, naming the field", () => {
    expect(refused("completions", { prompt: "x", n: 2 }).param).toBe("n");
    expect(refused("completions", { prompt: "x", best_of: 3 }).param).toBe("best_of");
    expect(refused("completions", { prompt: "x", echo: true }).param).toBe("echo");
    expect(refused("completions", { prompt: "x", logprobs: 2 }).param).toBe("logprobs");
    // 0 still asks for the sampled tokens' log probabilities (the completions API's meaning).
    expect(refused("completions", { prompt: "x", logprobs: 0 }).param).toBe("logprobs");
    expect(refused("completions", { prompt: ["a", "b"] }).param).toBe("prompt");
    expect(refused("completions", { prompt: "x", presence_penalty: 0.5 }).param).toBe("presence_penalty");
    expect(refused("chat", { messages: [{ role: "user", content: "x" }], tools: [{ type: "function" }] }).param).toBe("tools");
    expect(refused("chat", { messages: [{ role: "user", content: [{ type: "image_url", image_url: {} }] }] }).param).toBe("messages[0].content[0]");
    expect(refused("chat", { messages: [{ role: "user", content: "x" }], response_format: { type: "json_object" } }).param).toBe("response_format");
    // Defaults of those fields are fine.
    expect(() => readRequest("completions", { prompt: "x", n: 1, best_of: 1, echo: false, logprobs: null, presence_penalty: 0, logit_bias: {} }, 1)).not.toThrow();
  });

  it("refuses malformed fields with 400", () => {
    expect(refused("completions", []).param).toBe(null);
    expect(refused("completions", {}).param).toBe("prompt");
    expect(refused("completions", { prompt: "" }).param).toBe("prompt");
    expect(refused("completions", { prompt: [1, -2] }).param).toBe("prompt");
    expect(refused("completions", { prompt: "x", max_tokens: 0 }).param).toBe("max_tokens");
    expect(refused("completions", { prompt: "x", max_tokens: 1.5 }).param).toBe("max_tokens");
    expect(refused("completions", { prompt: "x", temperature: 3 }).param).toBe("temperature");
    expect(refused("completions", { prompt: "x", top_p: "1" }).param).toBe("top_p");
    expect(refused("completions", { prompt: "x", stop: [1] }).param).toBe("stop");
    expect(refused("completions", { prompt: "x", ignore_eos: "true" }).param).toBe("ignore_eos");
    expect(refused("completions", { prompt: "x", stream_options: { include_usage: true } }).param).toBe("stream_options");
    expect(refused("completions", { prompt: "x", model: 3 }).param).toBe("model");
    expect(refused("chat", { messages: [] }).param).toBe("messages");
    expect(refused("chat", { messages: Array.from({ length: 4097 }, () => ({ role: "user", content: "" })) })).toMatchObject({ param: "messages", message: "4097 messages exceed the limit of 4096" });
    expect(refused("chat", { messages: [{ role: "user", content: "x" }], session_id: "会话\n" })).toMatchObject({ param: "session_id", message: "session_id must match [A-Za-z0-9._-]{1,128}" });
    expect(refused("completions", { prompt: "x", session_id: "a".repeat(129) }).param).toBe("session_id");
    expect(refused("chat", { messages: [{ content: "x" }] }).param).toBe("messages[0].role");
  });
});

describe("OpenAI errors", () => {
  it("maps the Generate path's statuses to HTTP statuses in OpenAI's shape", () => {
    const cases: Array<[status, number, string]> = [
      [status.INVALID_ARGUMENT, 400, "invalid_request_error"],
      [status.FAILED_PRECONDITION, 400, "invalid_request_error"],
      [status.NOT_FOUND, 404, "invalid_request_error"],
      [status.RESOURCE_EXHAUSTED, 429, "rate_limit_error"],
      [status.UNAVAILABLE, 503, "server_error"],
      [status.DEADLINE_EXCEEDED, 504, "timeout"],
      [status.INTERNAL, 500, "server_error"],
    ];
    for (const [code, http, type] of cases) {
      const e = fromGrpcStatus({ code, details: `because ${code}` });
      expect(e.status, status[code]).toBe(http);
      expect(e.body()).toEqual({ error: { message: `because ${code}`, type, param: null, code: e.code } });
    }
 
    // A request that can never fit (the never-fits trailer) is 400 without a retry, not 429.
    const never = toStatus(neverFits("needs 9 bytes, more than the whole capacity of 8: it can never fit"), createLogger("test", "silent"), "Generate");
    const e = fromGrpcStatus(never);
    expect(e.status).toBe(400);
    expect(e.body()).toMatchObject({ error: { type: "invalid_request_error", code: "request_too_large", message: expect.stringMatching(/can never fit/) } });
  });
});

describe("the OpenAI front's settings", () => {
  it("is off unless FREEKV_OPENAI_PORT is set, and names bad values", () => {
    const off = parseConfig(computeConfigSchema, {});
    expect(off.FREEKV_OPENAI_PORT).toBeUndefined();
    expect(off.FREEKV_OPENAI_MAX_BODY_BYTES).toBe(8 << 20);
    const on = parseConfig(computeConfigSchema, { FREEKV_OPENAI_PORT: "8000", FREEKV_OPENAI_HOST: "0.0.0.0", FREEKV_MODEL_NAME: "llama-3.1-8b", FREEKV_OPENAI_MAX_BODY_BYTES: "1048576" });
    expect(on).toMatchObject({ FREEKV_OPENAI_PORT: 8000, FREEKV_OPENAI_HOST: "0.0.0.0", FREEKV_MODEL_NAME: "llama-3.1-8b", FREEKV_OPENAI_MAX_BODY_BYTES: 1 << 20 });
    expect(() => parseConfig(computeConfigSchema, { FREEKV_OPENAI_PORT: "70000" })).toThrow(/FREEKV_OPENAI_PORT="70000"/);
    expect(() => parseConfig(computeConfigSchema, { FREEKV_OPENAI_MAX_BODY_BYTES: "10" })).toThrow(/FREEKV_OPENAI_MAX_BODY_BYTES/);
    expect(() => parseConfig(computeConfigSchema, { FREEKV_MODEL_NAME: "two words" })).toThrow(/FREEKV_MODEL_NAME/);
  });
});
