/**
 * OpenAI request bodies (`/v1/completions`, `/v1/chat/completions`) read into a Generate request.
 * What the API has and Generate does too is mapped (prompt text or token ids, chat messages,
 * max_tokens / max_completion_tokens, temperature, top_p, seed, stop, stream and
 * stream_options.include_usage, plus top_k and ignore_eos as vLLM takes them); what would change the answer and is
 * not served (n > 1, best_of > 1, echo, logprobs, penalties, logit_bias, suffix, tools, a
 * response_format other than text, batched prompts) is a 400 naming the field, never silently
 * ignored. Fields without effect on the output (user, metadata, store, ...) are ignored.
 */
import type { GenerateRequest, SamplingParams } from "../../../proto/gen/freekv/v1/compute.js";
import { badRequest } from "./errors.js";
import { stopProblem } from "../generate/stop.js";
import { MAX_CHAT_MESSAGES } from "../model/tokenizer.js";
import { SESSION_ID_RE } from "../../common/session-id.js";

/**
 * A client's value in an error message: JSON, cut to 120 characters; one that JSON cannot show (a
 * nesting deep enough to overflow the stack) is named by its type. The body is bounded, but a 7 MB
 * field echoed whole made a 7 MB error.
 */
export function show(v: unknown): string {
  let s: string;
  try {
    s = JSON.stringify(v) ?? String(v);
  } catch {
    return `(${Array.isArray(v) ? "an array" : `a value of type ${typeof v}`} too deeply nested to show)`;
  }
  return s.length > 120 ? `${s.slice(0, 120)}... (${s.length} characters)` : s;
}

export type Endpoint = "completions" | "chat";

export interface OpenAIRequest {
  endpoint: Endpoint;
  /** The model the client named (undefined: the served one). */
  model?: string;
  prompt: NonNullable<GenerateRequest["prompt"]>;
  maxTokens: number;
  sampling: SamplingParams;
  stopStrings: string[];
  /** vLLM's ignore_eos: the model's EOS ids do not end the generation. */
  ignoreEos: boolean;
  stream: boolean;
  includeUsage: boolean;
  /** Named session from the body's session_id. */
  sessionId?: string;
}

/** OpenAI's own default of max_tokens for /v1/completions. */
export const COMPLETIONS_DEFAULT_MAX_TOKENS = 16;

type Body = Record<string, unknown>;

const isObject = (v: unknown): v is Body => typeof v === "object" && v !== null && !Array.isArray(v);
const absent = (v: unknown) => v === undefined || v === null;
const isTokenArray = (v: unknown): v is number[] => Array.isArray(v) && v.length > 0 && v.every((t) => typeof t === "number");

function optionalNumber(body: Body, field: string, min: number, max: number): number | undefined {
  const v = body[field];
  if (absent(v)) return undefined;
  if (typeof v !== "number" || !Number.isFinite(v) || v < min || v > max) throw badRequest(field, `${field} must be a number in [${min}, ${max}], got ${show(v)}`);
  return v;
}

function optionalInt(body: Body, field: string, min: number, max = Number.MAX_SAFE_INTEGER): number | undefined {
  const v = body[field];
  if (absent(v)) return undefined;
  if (typeof v !== "number" || !Number.isInteger(v) || v < min || v > max) throw badRequest(field, `${field} must be an integer >= ${min}${max < Number.MAX_SAFE_INTEGER ? ` and <= ${max}` : ""}, got ${show(v)}`);
  return v;
}

function optionalBool(body: Body, field: string): boolean | undefined {
  const v = body[field];
  if (absent(v)) return undefined;
  if (typeof v !== "boolean") throw badRequest(field, `${field} must be a boolean, got ${show(v)}`);
  return v;
}

/** A field that must stay at its default (what the front does not serve). */
function unsupported(body: Body, field: string, isDefault: (v: unknown) => boolean, what: string): void {
  const v = body[field];
  if (!absent(v) && !isDefault(v)) throw badRequest(field, `${field}: ${what} is not supported by this server`, "unsupported_parameter");
}

function completionPrompt(body: Body): OpenAIRequest["prompt"] {
  let p = body.prompt;
  if (absent(p)) throw badRequest("prompt", "prompt is required");
  // A batch of one prompt is that prompt.
  if (Array.isArray(p) && p.length === 1 && (typeof p[0] === "string" || Array.isArray(p[0]))) p = p[0];
  if (typeof p === "string") {
    if (!p) throw badRequest("prompt", "prompt must not be empty");
    return { $case: "text", value: p };
  }
  if (isTokenArray(p)) {
    p.forEach((t, i) => {
      if (!Number.isInteger(t) || t < 0) throw badRequest("prompt", `prompt[${i}] must be a token id (an integer >= 0), got ${t}`);
    });
    return { $case: "tokens", value: { ids: p } };
  }
  if (Array.isArray(p) && p.length > 1) throw badRequest("prompt", "a batch of several prompts is not supported by this server (send one prompt per request)", "unsupported_parameter");
  throw badRequest("prompt", "prompt must be a non-empty string or a non-empty array of token ids");
}

function messageContent(m: Body, i: number): string {
  const c = m.content;
  if (absent(c)) return "";
  if (typeof c === "string") return c;
  if (Array.isArray(c)) {
    return c
      .map((part: unknown, j) => {
        if (!isObject(part) || part.type !== "text" || typeof part.text !== "string")
          throw badRequest(`messages[${i}].content[${j}]`, `messages[${i}].content[${j}]: only text parts ({"type": "text", "text": ...}) are supported`);
        return part.text;
      })
      .join("");
  }
  throw badRequest(`messages[${i}].content`, `messages[${i}].content must be a string or an array of text parts`);
}

function chatPrompt(body: Body): OpenAIRequest["prompt"] {
  const ms = body.messages;
  if (!Array.isArray(ms) || ms.length === 0) throw badRequest("messages", "messages must be a non-empty array");
  if (ms.length > MAX_CHAT_MESSAGES) throw badRequest("messages", `${ms.length} messages exceed the limit of ${MAX_CHAT_MESSAGES}`);
  const messages = ms.map((m: unknown, i) => {
    if (!isObject(m)) throw badRequest(`messages[${i}]`, `messages[${i}] must be an object`);
    if (typeof m.role !== "string" || !m.role) throw badRequest(`messages[${i}].role`, `messages[${i}].role must be a non-empty string`);
    if (!absent(m.tool_calls)) throw badRequest(`messages[${i}].tool_calls`, "tool calls are not supported by this server", "unsupported_parameter");
    return { role: m.role, content: messageContent(m, i) };
  });
  return { $case: "chat", value: { messages } };
}

function stopStrings(body: Body): string[] {
  const s = body.stop;
  if (absent(s)) return [];
  const list = typeof s === "string" ? [s] : s;
  if (!Array.isArray(list) || !list.every((x) => typeof x === "string")) throw badRequest("stop", "stop must be a string or an array of strings");
  const problem = stopProblem(list, []);
  if (problem) throw badRequest("stop", `stop${problem.field.replace("stop_strings", "")} ${problem.why}`);
  return list.filter((x) => x.length > 0);
}

/**
 * Reads a parsed JSON body. `defaultMaxTokens` is chat's max_tokens when the body gives none
 * (OpenAI's "until the model stops": the context's size); completions default to 16 as OpenAI's.
 */
export function readRequest(endpoint: Endpoint, body: unknown, defaultMaxTokens: number): OpenAIRequest {
  if (!isObject(body)) throw badRequest(null, "the request body must be a JSON object");
  if (!absent(body.model) && typeof body.model !== "string") throw badRequest("model", "model must be a string");
  const model = typeof body.model === "string" && body.model ? body.model : undefined;

  const n = optionalInt(body, "n", 1);
  if (n !== undefined && n !== 1) throw badRequest("n", `n: only 1 choice per request is supported by this server, got ${n}`, "unsupported_parameter");
  unsupported(body, "presence_penalty", (v) => v === 0, "a non-zero presence_penalty");
  unsupported(body, "frequency_penalty", (v) => v === 0, "a non-zero frequency_penalty");
  unsupported(body, "logit_bias", (v) => isObject(v) && Object.keys(v).length === 0, "logit_bias");
  if (endpoint === "completions") {
    unsupported(body, "best_of", (v) => v === 1, "best_of > 1");
    unsupported(body, "echo", (v) => v === false, "echo");
    // (logprobs: 0 still asks for the sampled tokens' log probabilities in the completions API.)
    unsupported(body, "logprobs", () => false, "logprobs");
    unsupported(body, "suffix", (v) => v === "", "suffix");
  } else {
    unsupported(body, "logprobs", (v) => v === false, "logprobs");
    unsupported(body, "top_logprobs", (v) => v === 0, "top_logprobs");
    unsupported(body, "tools", (v) => Array.isArray(v) && v.length === 0, "tools");
    unsupported(body, "functions", (v) => Array.isArray(v) && v.length === 0, "functions");
    unsupported(body, "tool_choice", (v) => v === "none", "tool_choice");
    unsupported(body, "response_format", (v) => isObject(v) && v.type === "text", "a response_format other than text");
  }

  const prompt = endpoint === "completions" ? completionPrompt(body) : chatPrompt(body);
  const maxCompletion = endpoint === "chat" ? optionalInt(body, "max_completion_tokens", 1) : undefined;
  const maxTokens = maxCompletion ?? optionalInt(body, "max_tokens", 1) ?? (endpoint === "completions" ? COMPLETIONS_DEFAULT_MAX_TOKENS : defaultMaxTokens);

  // OpenAI's defaults: temperature 1, top_p 1 (Generate: 0 or 1 is off).
  let temperature = optionalNumber(body, "temperature", 0, 2) ?? 1;
  const topP = optionalNumber(body, "top_p", 0, 1) ?? 1;
  // top_p -> 0 keeps only the most likely token.
  if (topP === 0) temperature = 0;
  const topK = optionalInt(body, "top_k", -1) ?? 0;
  const seed = optionalInt(body, "seed", 0) ?? 0;
  const ignoreEos = optionalBool(body, "ignore_eos") ?? false;

  const stream = optionalBool(body, "stream") ?? false;
  let includeUsage = false;
  if (!absent(body.stream_options)) {
    if (!stream) throw badRequest("stream_options", "stream_options is only allowed when stream is true");
    if (!isObject(body.stream_options)) throw badRequest("stream_options", "stream_options must be an object");
    includeUsage = optionalBool(body.stream_options, "include_usage") ?? false;
  }

  let sessionId: string | undefined;
  if (!absent(body.session_id)) {
    if (typeof body.session_id !== "string" || !body.session_id) throw badRequest("session_id", "session_id must be a non-empty string");
    // It is echoed in a response header: only the ids a session may have.
    if (!SESSION_ID_RE.test(body.session_id)) throw badRequest("session_id", "session_id must match [A-Za-z0-9._-]{1,128}");
    sessionId = body.session_id;
  }

  return {
    endpoint,
    model,
    prompt,
    maxTokens,
    sampling: { temperature, topP: topP === 1 ? 0 : topP, topK: Math.max(0, topK), seed },
    stopStrings: stopStrings(body),
    ignoreEos,
    stream,
    includeUsage,
    sessionId,
  };
}
