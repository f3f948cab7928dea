/**
 * The OpenAI-compatible HTTP front of the compute process (FREEKV_OPENAI_PORT), driven by the
 * official `openai` client against the real tiers serving the built-in model, with gRPC Generate
 * on the same process as the reference: greedy completions and chats give Generate's text and
 * usage, streamed chunks add up to the non-streamed answer, stop strings end it, a session named
 * by the header continues like a named gRPC session, a client that goes away stops the
 * generation, a deadline header is honoured, and errors come in OpenAI's shape and status.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import OpenAI, { APIError } from "openai";
import { Metadata, type ClientReadableStream } from "@grpc/grpc-js";
import { GenerateRequest, type GenerateFinal, type GenerateResponse } from "../../proto/gen/freekv/v1/compute.js";
import { QUIET, computeClient, fetchMetrics, kvstoreClient, metricValue, startTiers, unary, type Tiers } from "../helpers/services.js";

const MODEL = "freekv-builtin";
const MAX_BODY = 65536;

let tiers: Tiers;
let grpc: ReturnType<typeof computeClient>;
let kv: ReturnType<typeof kvstoreClient>;
let openai: OpenAI;
let base: string;

beforeAll(async () => {
  tiers = await startTiers({
    kvstoreEnv: QUIET,
    computeEnv: { ...QUIET, FREEKV_THREADS: "2", FREEKV_MAX_CONTEXT_TOKENS: "4096", FREEKV_OPENAI_PORT: "0", FREEKV_MODEL_NAME: MODEL, FREEKV_OPENAI_MAX_BODY_BYTES: String(MAX_BODY) },
  });
  grpc = computeClient(tiers.compute.address);
  kv = kvstoreClient(tiers.kvstore.address);
  expect(tiers.compute.openaiPort, "compute reports the front's port").toBeGreaterThan(0);
  base = `http://127.0.0.1:${tiers.compute.openaiPort}`;
  openai = new OpenAI({ apiKey: "unused", baseURL: `${base}/v1`, maxRetries: 0, timeout: 60_000 });
});

afterAll(async () => {
  grpc?.close();
  kv?.close();
  await tiers?.stop();
});

interface Reference {
  text: string;
  final: GenerateFinal;
}

/** gRPC Generate on the same process: the reference. */
function generate(req: Partial<GenerateRequest>): Promise<Reference> {
  const stream: ClientReadableStream<GenerateResponse> = grpc.generate(GenerateRequest.fromPartial(req), new Metadata(), { deadline: Date.now() + 60_000 });
  let text = "";
  let final: GenerateFinal | undefined;
  return new Promise((resolve, reject) => {
    stream.on("data", (m: GenerateResponse) => {
      if (m.event?.$case === "chunk") text += m.event.value.text;
      else if (m.event?.$case === "final") final = m.event.value;
    });
    stream.on("error", reject);
    stream.on("end", () => (final ? resolve({ text, final }) : reject(new Error("no final message"))));
  });
}

const GREEDY = { temperature: 0, topP: 0, topK: 0, seed: 0 };
const text = (value: string) => ({ $case: "text" as const, value });

/** The error a call fails with (an APIError from the client). */
async function apiError(p: Promise<unknown>): Promise<APIError> {
  const e = await p.then(
    () => undefined,
    (err: unknown) => err,
  );
  expect(e, "the call should fail").toBeInstanceOf(APIError);
  return e as APIError;
}

async function kvSessions(): Promise<string[]> {
  return (await unary<{ sessionIds: string[] }>(kv, "listSessions", {})).sessionIds;
}

async function createSession(sessionId: string): Promise<void> {
  await unary(grpc, "createSession", { sessionId, kind: 1, maxContextTokens: 4096 });
}

describe("the OpenAI front: models and health", () => {
  it("lists the served model under FREEKV_MODEL_NAME and answers /health", async () => {
    const list = await openai.models.list();
    expect(list.data.map((m) => m.id)).toEqual([MODEL]);
    expect((await openai.models.retrieve(MODEL)).id).toBe(MODEL);
    const missing = await apiError(openai.models.retrieve("builtin"));
    expect(missing.status).toBe(404);
    const health = await fetch(`${base}/health`);
    expect(health.status).toBe(200);
    expect(await health.json()).toEqual({ status: "ok" });
  });
});

describe("the OpenAI front: completions", () => {
  const prompt = "The quick brown fox";

  it("gives gRPC Generate's greedy text, usage and finish reason", async () => {
    const ref = await generate({ prompt: text(prompt), maxTokens: 16, sampling: GREEDY });
    const r = await openai.completions.create({ model: MODEL, prompt, max_tokens: 16, temperature: 0 });
    expect(ref.text.length).toBeGreaterThan(0);
    expect(r.object).toBe("text_completion");
    expect(r.model).toBe(MODEL);
    expect(r.choices).toHaveLength(1);
    expect(r.choices[0].text).toBe(ref.text);
    expect(r.choices[0].finish_reason).toBe(ref.final.finishReason === 1 ? "length" : "stop");
    expect(r.usage).toEqual({
      prompt_tokens: ref.final.usage!.promptTokens,
      completion_tokens: ref.final.usage!.completionTokens,
      total_tokens: ref.final.usage!.promptTokens + ref.final.usage!.completionTokens,
    });
  });

  it("takes a prompt of token ids", async () => {
    const ids = [5, 77, 301, 42, 9, 128];
    const ref = await generate({ prompt: { $case: "tokens", value: { ids } }, maxTokens: 10, sampling: GREEDY });
    const r = await openai.completions.create({ model: MODEL, prompt: ids, max_tokens: 10, temperature: 0 });
    expect(r.choices[0].text).toBe(ref.text);
    expect(r.usage?.prompt_tokens).toBe(ids.length);
    expect(r.usage?.completion_tokens).toBe(ref.final.usage!.completionTokens);
  });

  it("streams chunks that add up to the non-streamed text, then the usage and [DONE]", async () => {
    const whole = await openai.completions.create({ model: MODEL, prompt, max_tokens: 20, temperature: 0 });
    const stream = await openai.completions.create({ model: MODEL, prompt, max_tokens: 20, temperature: 0, stream: true, stream_options: { include_usage: true } });
    let streamed = "";
    const finishes: Array<string | null> = [];
    let usage: OpenAI.CompletionUsage | null | undefined;
    let chunks = 0;
    for await (const c of stream) {
      chunks++;
      for (const ch of c.choices) {
        streamed += ch.text;
        finishes.push(ch.finish_reason);
      }
      if (c.usage) {
        expect(c.choices).toEqual([]);
        usage = c.usage;
      }
    }
    expect(chunks).toBeGreaterThan(2);
    expect(streamed).toBe(whole.choices[0].text);
    expect(finishes.at(-1)).toBe(whole.choices[0].finish_reason);
    expect(finishes.slice(0, -1).every((f) => f === null)).toBe(true);
    expect(usage).toEqual(whole.usage);
    // On the wire: Server-Sent Events ending with [DONE].
    const raw = await fetch(`${base}/v1/completions`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ prompt, max_tokens: 4, temperature: 0, stream: true }) });
    expect(raw.headers.get("content-type")).toBe("text/event-stream");
    const body = await raw.text();
    expect(body.startsWith("data: {")).toBe(true);
    expect(body.endsWith("data: [DONE]\n\n")).toBe(true);
  });

  it("ends the output before a stop string, as Generate does", async () => {
    const whole = (await openai.completions.create({ model: MODEL, prompt, max_tokens: 24, temperature: 0 })).choices[0].text;
    // A 3-character piece first occurring after the start: the answer ends right before it.
    let at = -1;
    for (let k = 3; k + 3 <= whole.length; k++) {
      if (whole.indexOf(whole.slice(k, k + 3)) === k) {
        at = k;
        break;
      }
    }
    expect(at, `a stop string to cut ${JSON.stringify(whole)} at`).toBeGreaterThan(0);
    const stop = whole.slice(at, at + 3);
    const ref = await generate({ prompt: text(prompt), maxTokens: 24, sampling: GREEDY, stopStrings: [stop] });
    const r = await openai.completions.create({ model: MODEL, prompt, max_tokens: 24, temperature: 0, stop });
    expect(r.choices[0].text).toBe(whole.slice(0, at));
    expect(r.choices[0].text).toBe(ref.text);
    expect(r.choices[0].finish_reason).toBe("stop");
    expect(r.usage?.completion_tokens).toBe(ref.final.usage!.completionTokens);
    expect(r.usage!.completion_tokens).toBeLessThan(24);
    // The same through a stream, with the stop strings as a list.
    const stream = await openai.completions.create({ model: MODEL, prompt, max_tokens: 24, temperature: 0, stop: ["\u0000never", stop], stream: true });
    let streamed = "";
    let finish: string | null = null;
    for await (const c of stream) for (const ch of c.choices) (streamed += ch.text), (finish = ch.finish_reason ?? finish);
    expect(streamed).toBe(whole.slice(0, at));
    expect(finish).toBe("stop");
  });
});

describe("the OpenAI front: chat completions", () => {
  const messages = [
    { role: "system" as const, content: "You are terse." },
    { role: "user" as const, content: "Name a colour." },
  ];

  it("renders the messages with the chat template, as Generate's chat prompt", async () => {
    const ref = await generate({ prompt: { $case: "chat", value: { messages } }, maxTokens: 12, sampling: GREEDY });
    const r = await openai.chat.completions.create({ model: MODEL, messages, max_completion_tokens: 12, temperature: 0 });
    expect(r.object).toBe("chat.completion");
    expect(r.choices[0].message.role).toBe("assistant");
    expect(r.choices[0].message.content).toBe(ref.text);
    expect(r.usage?.prompt_tokens).toBe(ref.final.usage!.promptTokens);
    expect(r.usage?.completion_tokens).toBe(ref.final.usage!.completionTokens);
    // Not the raw text of the messages: the template's rendering is longer.
    const raw = await generate({ prompt: text(messages.map((m) => m.content).join("\n")), maxTokens: 1, sampling: GREEDY });
    expect(r.usage!.prompt_tokens).toBeGreaterThan(raw.final.usage!.promptTokens + 4);
    // Content as text parts is the same message.
    const parts = await openai.chat.completions.create({
      model: MODEL,
      messages: [messages[0], { role: "user", content: [{ type: "text", text: "Name a " }, { type: "text", text: "colour." }] }],
      max_tokens: 12,
      temperature: 0,
    });
    expect(parts.choices[0].message.content).toBe(ref.text);
  });

  it("streams deltas that add up to the non-streamed message", async () => {
    const whole = await openai.chat.completions.create({ model: MODEL, messages, max_tokens: 16, temperature: 0 });
    const stream = await openai.chat.completions.create({ model: MODEL, messages, max_tokens: 16, temperature: 0, stream: true, stream_options: { include_usage: true } });
    let content = "";
    let role: string | undefined;
    let finish: string | null = null;
    let usage: OpenAI.CompletionUsage | null | undefined;
    for await (const c of stream) {
      expect(c.object).toBe("chat.completion.chunk");
      for (const ch of c.choices) {
        role ??= ch.delta.role;
        content += ch.delta.content ?? "";
        finish = ch.finish_reason ?? finish;
      }
      if (c.usage) usage = c.usage;
    }
    expect(role).toBe("assistant");
    expect(content).toBe(whole.choices[0].message.content);
    expect(finish).toBe(whole.choices[0].finish_reason);
    expect(usage).toEqual(whole.usage);
  });
});

describe("the OpenAI front: sessions", () => {
  it("continues the session the x-freekv-session-id header names, as Generate on a named session", async () => {
    const turns = ["Once upon a time", " there was", " and then"];
    await createSession("openai-turns");
    await createSession("grpc-turns");
    try {
      for (const [i, turn] of turns.entries()) {
        const ref = await generate({ sessionId: "grpc-turns", prompt: text(turn), maxTokens: 6, sampling: GREEDY });
        const { data, response } = await openai.completions
          .create({ model: MODEL, prompt: turn, max_tokens: 6, temperature: 0 }, { headers: { "x-freekv-session-id": "openai-turns" } })
          .withResponse();
        expect(response.headers.get("x-freekv-session-id")).toBe("openai-turns");
        expect(data.choices[0].text, `turn ${i}`).toBe(ref.text);
        expect(data.usage?.prompt_tokens).toBe(ref.final.usage!.promptTokens);
      }
      const a = await unary<{ session: { contextTokens: number } }>(grpc, "getSession", { sessionId: "openai-turns" });
      const b = await unary<{ session: { contextTokens: number } }>(grpc, "getSession", { sessionId: "grpc-turns" });
      expect(a.session.contextTokens).toBeGreaterThan(18);
      expect(a.session.contextTokens).toBe(b.session.contextTokens);
      // The body's session_id names it too.
      const ref = await generate({ sessionId: "grpc-turns", prompt: text(" at last"), maxTokens: 6, sampling: GREEDY });
      const r = await openai.completions.create({ model: MODEL, prompt: " at last", max_tokens: 6, temperature: 0, session_id: "openai-turns" } as OpenAI.CompletionCreateParamsNonStreaming);
      expect(r.choices[0].text).toBe(ref.text);
    } finally {
      await unary(grpc, "closeSession", { sessionId: "openai-turns" }).catch(() => {});
      await unary(grpc, "closeSession", { sessionId: "grpc-turns" }).catch(() => {});
    }
  });

  it("answers 404 for a session that does not exist", async () => {
    const e = await apiError(openai.completions.create({ model: MODEL, prompt: "x", max_tokens: 2 }, { headers: { "x-freekv-session-id": "no-such-session" } }));
    expect(e.status).toBe(404);
    expect(e.error).toMatchObject({ type: "invalid_request_error", code: "not_found" });
    expect(e.message).toMatch(/no-such-session/);
  });
});

describe("the OpenAI front: cancellation and deadlines", () => {
  it("stops the generation when the client goes away", async () => {
    const completion = async () => metricValue(await fetchMetrics(tiers.compute.metricsPort), "freekv_generate_tokens_total", 'kind="completion"') ?? 0;
    const cancelled = async () => metricValue(await fetchMetrics(tiers.compute.metricsPort), "freekv_generate_requests_total", 'finish="cancelled"') ?? 0;
    const before = await completion();
    const cancelledBefore = await cancelled();
    const ac = new AbortController();
    const stream = await openai.completions.create({ model: MODEL, prompt: "Tell me everything", max_tokens: 20_000, temperature: 0, stream: true }, { signal: ac.signal });
    let chunks = 0;
    try {
      for await (const _ of stream) if (++chunks === 3) ac.abort();
    } catch {
      // the client's abort
    }
    expect(chunks).toBeGreaterThanOrEqual(3);
    // The fresh session is closed (its segments released) and the call counted as cancelled.
    const t0 = Date.now();
    while ((await kvSessions()).length > 0 || (await cancelled()) === cancelledBefore) {
      expect(Date.now() - t0, "the generation should stop within 10 s").toBeLessThan(10_000);
      await new Promise((r) => setTimeout(r, 50));
    }
    // Far from the 4096 tokens of the context it would have run to.
    expect(await completion()).toBeLessThan(before + 1000);
  });

  it("honours the x-freekv-timeout-ms deadline (504)", async () => {
    const e = await apiError(openai.completions.create({ model: MODEL, prompt: "Tell me everything", max_tokens: 20_000, temperature: 0 }, { headers: { "x-freekv-timeout-ms": "200" } }));
    expect(e.status).toBe(504);
    expect(e.error).toMatchObject({ code: "deadline_exceeded" });
  });
});

describe("the OpenAI front: errors in OpenAI's shape", () => {
  const shape = (e: APIError) => {
    const body = e.error as Record<string, unknown>;
    expect(Object.keys(body).sort()).toEqual(["code", "message", "param", "type"]);
    return body;
  };

  it("refuses n > 1 with 400 naming the parameter", async () => {
    const e = await apiError(openai.completions.create({ model: MODEL, prompt: "x", max_tokens: 2, n: 2 }));
    expect(e.status).toBe(400);
    expect(shape(e)).toMatchObject({ type: "invalid_request_error", param: "n" });
    const chat = await apiError(openai.chat.completions.create({ model: MODEL, messages: [{ role: "user", content: "x" }], n: 3 }));
    expect(chat.status).toBe(400);
    expect(shape(chat).param).toBe("n");
  });

  it("answers 404 model_not_found for another model", async () => {
    const e = await apiError(openai.completions.create({ model: "gpt-4o", prompt: "x", max_tokens: 2 }));
    expect(e.status).toBe(404);
    expect(shape(e)).toMatchObject({ param: "model", code: "model_not_found" });
    // A model path that is not valid percent-encoding is the client's error, not the server's.
    const bad = await fetch(`${base}/v1/models/%zz`);
    expect(bad.status).toBe(400);
    expect(((await bad.json()) as { error: { type: string } }).error.type).toBe("invalid_request_error");
  });

  it("answers 400 for a body that is not JSON, and for bad fields", async () => {
    const r = await fetch(`${base}/v1/chat/completions`, { method: "POST", headers: { "content-type": "application/json" }, body: '{"model": "x", messages: [' });
    expect(r.status).toBe(400);
    const body = (await r.json()) as { error: Record<string, unknown> };
    expect(body.error).toMatchObject({ type: "invalid_request_error", code: "invalid_json", param: null });
    expect(typeof body.error.message).toBe("string");
    const zero = await apiError(openai.completions.create({ model: MODEL, prompt: "x", max_tokens: 0 }));
    expect(zero.status).toBe(400);
    expect(shape(zero).param).toBe("max_tokens");
    const noMessages = await apiError(openai.chat.completions.create({ model: MODEL, messages: [] }));
    expect(noMessages.status).toBe(400);
    expect(shape(noMessages).param).toBe("messages");
    // Too long for the fresh session's context: Generate's INVALID_ARGUMENT, as a 400.
    const long = await apiError(openai.completions.create({ model: MODEL, prompt: Array.from({ length: 5000 }, (_, i) => i % 500), max_tokens: 2 }));
    expect(long.status).toBe(400);
    expect(long.message).toMatch(/context/);
  });

  it("refuses a body over FREEKV_OPENAI_MAX_BODY_BYTES with 413, before parsing it", async () => {
    const e = await apiError(openai.completions.create({ model: MODEL, prompt: "a".repeat(MAX_BODY + 1), max_tokens: 2 }));
    expect(e.status).toBe(413);
    expect(shape(e)).toMatchObject({ type: "invalid_request_error", code: "request_too_large" });
    // Not JSON at all, and larger still: the size is what is refused.
    const r = await fetch(`${base}/v1/completions`, { method: "POST", body: "{".repeat(4 * MAX_BODY) });
    expect(r.status).toBe(413);
    // The server still serves.
    expect((await openai.completions.create({ model: MODEL, prompt: "x", max_tokens: 1, temperature: 0 })).choices).toHaveLength(1);
  });

  it("answers 400 for a header it cannot pass on, and for a malformed session header", async () => {
    const post = (headers: Record<string, string>) =>
      fetch(`${base}/v1/completions`, { method: "POST", headers: { "content-type": "application/json", ...headers }, body: JSON.stringify({ model: MODEL, prompt: "x", max_tokens: 1 }) });
    for (const [headers, code, param] of [
      [{ "x-freekv-trace-bin": "1" }, "invalid_header", null],
      [{ "x-freekv-tenant": "caf\u00e9" }, "invalid_header", null],
      [{ "x-freekv-session-id": "no spaces allowed" }, null, "session_id"],
      [{ "x-freekv-session-id": "s".repeat(129) }, null, "session_id"],
    ] as const) {
      const r = await post(headers as Record<string, string>);
      expect(r.status, JSON.stringify(headers)).toBe(400);
      expect(((await r.json()) as { error: { code: string | null; param: string | null } }).error).toMatchObject({ code, param });
    }
    // The server still serves.
    expect((await post({})).status).toBe(200);
  });

  it("answers 404 for an unknown path and 405 for a wrong method", async () => {
    const r = await fetch(`${base}/v1/embeddings`, { method: "POST", body: "{}" });
    expect(r.status).toBe(404);
    expect(((await r.json()) as { error: { type: string } }).error.type).toBe("invalid_request_error");
    const g = await fetch(`${base}/v1/completions`);
    expect(g.status).toBe(405);
  });
});
