/**
 * The OpenAI-compatible HTTP front of the compute process (FREEKV_OPENAI_PORT), for gateways that
 * route LLM traffic in that API: `GET /v1/models`, `POST /v1/completions`,
 * `POST /v1/chat/completions` (JSON, or Server-Sent Events with `stream: true`), `GET /health`.
 *
 * A request becomes a Generate request served in process by the gRPC server's own handler
 * (call.ts): the same served model, scheduler, sessions, limits and metrics. A fresh session per
 * request unless the `x-freekv-session-id` header (or the body's `session_id`) names one to
 * continue; the response carries the header back. A client that goes away cancels the
 * generation; `x-freekv-timeout-ms` gives it a deadline. The body is bounded
 * (FREEKV_OPENAI_MAX_BODY_BYTES) before it is parsed; errors are OpenAI's JSON shape (errors.ts).
 *
 * With compute's TLS settings the front serves HTTPS with the same certificate, and with a client
 * CA it requires client certificates as the gRPC port does: the front is never a plaintext way
 * around them. An error after a stream started is always its last event, written behind what the
 * client has not read yet; a response whose client stops reading is closed once it has not been
 * flushed for FREEKV_WRITE_STALL_MS. At the drain, responses still being flushed to slow readers
 * finish (for up to `close`'s wait) before the connections are closed.
 */
import { randomUUID } from "node:crypto";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { createServer as createHttpsServer, type ServerOptions as HttpsOptions } from "node:https";
import type { Socket } from "node:net";
import { FinishReason, type GenerateFinal, type GenerateRequest, type GenerateResponse } from "../../../proto/gen/freekv/v1/compute.js";
import type { Logger } from "../../common/log.js";
import { startGenerate, type GenerateHandler } from "./call.js";
import type { Metadata, StatusObject } from "@grpc/grpc-js";
import { badRequest, fromGrpcStatus, HttpError } from "./errors.js";
import { Metadata as GrpcMetadata } from "@grpc/grpc-js";
import type { TenantAuth } from "../auth.js";
import { SESSION_OWNER_KEY } from "../sessions/owners.js";
import { readRequest, show, type Endpoint, type OpenAIRequest } from "./requests.js";
import { SESSION_ID_RE } from "../../common/session-id.js";

export const SESSION_HEADER = "x-freekv-session-id";
export const TIMEOUT_HEADER = "x-freekv-timeout-ms";

export interface OpenAIFrontOptions {
  /** The gRPC server's Generate handler. */
  generate: GenerateHandler;
  /** Whether the compute service serves now (its gRPC health): otherwise generation gets 503. */
  serving(): boolean;
  /** Why the model will never serve (its load failed), if it will not: generation gets 500 saying so instead of 503 "retry later". */
  modelFailure?(): string | undefined;
  /** The served model's id; undefined when no model is served. */
  modelName: string | undefined;
  /** Largest body read, in bytes. */
  maxBodyBytes: number;
  /** Chat's max_tokens when the request gives none. */
  defaultMaxTokens: number;
  /** Per-tenant tokens (FREEKV_AUTH_TOKENS_FILE): the model list needs one too (generation is checked by the handler). */
  auth?: TenantAuth;
  /** HTTPS instead of HTTP (compute's certificate, key and client CA: see tls.ts httpsOptions). */
  tls?: HttpsOptions;
  /** How long an ended response may wait for a client that stopped reading before it is closed (FREEKV_WRITE_STALL_MS; 0: no limit). */
  writeStallMs?: number;
  log: Logger;
}

export interface OpenAIFront {
  readonly server: Server;
  listen(host: string, port: number): Promise<number>;
  /**
   * Stops accepting, closes idle connections, lets responses still being flushed finish for up
   * to `waitMs` (default 5 s), then closes every connection (at the end of the drain).
   */
  close(waitMs?: number): Promise<void>;
}

const CREATED = Math.floor(Date.now() / 1000);

const finishReason = (f: FinishReason | undefined): "stop" | "length" =>
  f === FinishReason.FINISH_REASON_STOP_TOKEN || f === FinishReason.FINISH_REASON_STOP_STRING ? "stop" : "length";

function sendJson(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  const data = JSON.stringify(body);
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(data), ...headers });
  res.end(data);
}

/** The body, refused with 413 once it passes `limit` bytes (the rest is read and dropped, so the client gets the answer). */
function readBody(req: IncomingMessage, limit: number): Promise<Buffer> {
  const tooLarge = () => new HttpError(413, `the request body is larger than ${limit} bytes (FREEKV_OPENAI_MAX_BODY_BYTES)`, null, "request_too_large");
  const declared = Number(req.headers["content-length"]);
  if (Number.isFinite(declared) && declared > limit) {
    req.resume();
    return Promise.reject(tooLarge());
  }
  return new Promise((resolve, reject) => {
    const parts: Buffer[] = [];
    let size = 0;
    let over = false;
    req.on("data", (b: Buffer) => {
      size += b.length;
      if (size > limit) over = true;
      if (!over) parts.push(b);
    });
    req.on("end", () => (over ? reject(tooLarge()) : resolve(Buffer.concat(parts))));
    // The client went away before its body was read (aborted, reset): its problem, not ours.
    req.on("error", (e: Error) => reject(new HttpError(400, `the request body could not be read: ${e.message}`, null, "client_closed")));
  });
}

/** An error response; overload and not-ready ask the client to come back (Retry-After). */
function sendError(res: ServerResponse, err: HttpError, headers: Record<string, string> = {}): void {
  sendJson(res, err.status, err.body(), err.status === 429 || err.status === 503 ? { "retry-after": "1", ...headers } : headers);
}

function parseJson(body: Buffer): unknown {
  try {
    return JSON.parse(body.toString("utf8"));
  } catch (e) {
    throw badRequest(null, `the request body is not valid JSON: ${(e as Error).message}`, "invalid_json");
  }
}

/** gRPC metadata as text (grpc-js refuses anything else): key and value. */
const METADATA_KEY = /^[0-9a-z_.-]+$/;
const METADATA_VALUE = /^[\x20-\x7e]*$/;

function header(req: IncomingMessage, name: string): string | undefined {
  const v = req.headers[name];
  return Array.isArray(v) ? v[0] : v;
}

export function createOpenAIFront(opts: OpenAIFrontOptions): OpenAIFront {
  const { log } = opts;

  const modelObject = (id: string) => ({ id, object: "model", created: CREATED, owned_by: "freekv" });

  async function route(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const path = (req.url ?? "/").split("?")[0];
    const method = req.method ?? "GET";
    const only = (allowed: string) => {
      if (method !== allowed) throw new HttpError(405, `${method} ${path}: use ${allowed}`, null, "method_not_allowed");
    };
    if (path === "/health") {
      only("GET");
      const up = opts.serving();
      return sendJson(res, up ? 200 : 503, { status: up ? "ok" : "not_serving" });
    }
    // With tenant tokens, every /v1 call shows its token before anything is read or said (the
    // served model's name, a load failure, a body's errors). The generation itself authenticates
    // again in the Generate handler, which names the tenant.
    if (opts.auth && path.startsWith("/v1/")) {
      const md = new GrpcMetadata();
      try {
        if (typeof req.headers.authorization === "string") md.set("authorization", req.headers.authorization);
        opts.auth.authenticate(md);
      } catch (e) {
        throw new HttpError(401, (e as Error).message, null, "unauthenticated");
      }
    }
    if (path === "/v1/models") {
      only("GET");
      return sendJson(res, 200, { object: "list", data: opts.modelName ? [modelObject(opts.modelName)] : [] });
    }
    if (path.startsWith("/v1/models/")) {
      only("GET");
      let id: string;
      try {
        id = decodeURIComponent(path.slice("/v1/models/".length));
      } catch {
        throw new HttpError(400, `${show(path)} is not a valid URL path (bad percent-encoding)`);
      }
      if (id !== opts.modelName) throw new HttpError(404, `the model ${show(id)} does not exist`, "model", "model_not_found");
      return sendJson(res, 200, modelObject(id));
    }
    const endpoint: Endpoint | undefined = path === "/v1/completions" ? "completions" : path === "/v1/chat/completions" ? "chat" : undefined;
    if (!endpoint) throw new HttpError(404, `${method} ${path}: no such endpoint (served: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health)`, null, "unknown_url");
    only("POST");
    const body = await readBody(req, opts.maxBodyBytes);
    const failed = opts.modelFailure?.();
    if (failed !== undefined) throw new HttpError(500, `the model could not be loaded, and this server will not serve it until it is fixed and restarted: ${failed.slice(0, 1024)}`, null, "model_load_failed");
    if (!opts.serving()) throw new HttpError(503, "the service is not ready (its model is loading, its kvstore does not serve, or it is draining); retry later", null, "unavailable");
    const r = readRequest(endpoint, parseJson(body), opts.defaultMaxTokens);
    if (!opts.modelName) throw new HttpError(404, "no model is served by this server", "model", "model_not_found");
    if (r.model !== undefined && r.model !== opts.modelName) throw new HttpError(404, `the model ${show(r.model)} does not exist; this server serves ${JSON.stringify(opts.modelName)}`, "model", "model_not_found");
    const fromHeader = header(req, SESSION_HEADER);
    if (fromHeader !== undefined && r.sessionId !== undefined && fromHeader !== r.sessionId)
      throw badRequest("session_id", `the ${SESSION_HEADER} header (${show(fromHeader)}) and the body's session_id (${show(r.sessionId)}) name different sessions`);
    if (fromHeader && !SESSION_ID_RE.test(fromHeader)) throw badRequest("session_id", `the ${SESSION_HEADER} header must match [A-Za-z0-9._-]{1,128}, got ${show(fromHeader)}`);
    const sessionId = fromHeader || r.sessionId || "";
    let deadline: number | undefined;
    const timeout = header(req, TIMEOUT_HEADER);
    if (timeout !== undefined) {
      const ms = Number(timeout);
      if (!/^\d+$/.test(timeout.trim()) || !Number.isSafeInteger(ms) || ms < 1) throw badRequest(null, `the ${TIMEOUT_HEADER} header must be a positive integer of milliseconds, got ${show(timeout)}`);
      deadline = Date.now() + ms;
    }
    // The service's own x-freekv-* request headers reach the handler as the gRPC metadata they are there.
    const metadata: Record<string, string> = {};
    for (const [k, v] of Object.entries(req.headers)) {
      if (!(k.startsWith("x-freekv-") || k === "authorization") || typeof v !== "string") continue;
      // What gRPC metadata can carry as text: a header it would refuse is the request's problem.
      if (!METADATA_KEY.test(k) || k.endsWith("-bin")) throw badRequest(null, `the ${k} header cannot be passed on as gRPC metadata (its name must match [0-9a-z_.-]+ and not end in -bin)`, "invalid_header");
      if (!METADATA_VALUE.test(v)) throw badRequest(null, `the ${k} header holds characters gRPC metadata cannot carry (printable ASCII only)`, "invalid_header");
      metadata[k] = v;
    }
    await serveGeneration(r, sessionId, deadline, metadata, res);
  }

  async function serveGeneration(r: OpenAIRequest, sessionId: string, deadline: number | undefined, metadata: Record<string, string>, res: ServerResponse): Promise<void> {
    const request: GenerateRequest = {
      sessionId,
      prompt: r.prompt,
      maxTokens: r.maxTokens,
      sampling: r.sampling,
      stopTokenIds: [],
      stopStrings: r.stopStrings,
      retrieval: undefined,
      prefillProgressMinTokens: 0,
      ignoreEos: r.ignoreEos,
    };
    const chat = r.endpoint === "chat";
    const id = `${chat ? "chatcmpl" : "cmpl"}-${randomUUID().replaceAll("-", "")}`;
    const created = Math.floor(Date.now() / 1000);
    const model = opts.modelName!;
    const headers: Record<string, string> = sessionId ? { [SESSION_HEADER]: sessionId } : {};
    const object = chat ? "chat.completion.chunk" : "text_completion";

    let text = "";
    let final: GenerateFinal | undefined;
    let opened = false;
    const sse = (data: unknown): boolean => res.write(`data: ${JSON.stringify(data)}\n\n`);
    const chunk = (delta: { text?: string; role?: string }, finish: string | null) => ({
      id,
      object,
      created,
      model,
      choices: [
        chat
          ? { index: 0, delta: { ...(delta.role ? { role: delta.role } : {}), ...(delta.text !== undefined ? { content: delta.text } : {}) }, logprobs: null, finish_reason: finish }
          : { index: 0, text: delta.text ?? "", logprobs: null, finish_reason: finish },
      ],
      ...(r.includeUsage ? { usage: null } : {}),
    });
    // Headers go out with the first token, so an error before it (a bad prompt, an unknown
    // session, overload) still gets its own HTTP status.
    const open = () => {
      if (opened) return;
      opened = true;
      res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache", connection: "keep-alive", ...headers });
    };

    const call = startGenerate(opts.generate, request, {
      deadline,
      metadata,
      onMessage(msg: GenerateResponse): boolean {
        const e = msg.event;
        if (e?.$case === "final") {
          final = e.value;
          return true;
        }
        if (e?.$case !== "chunk") return true;
        if (!r.stream) {
          text += e.value.text;
          return true;
        }
        if (!opened) {
          open();
          if (chat) return sse(chunk({ role: "assistant", text: e.value.text }, null));
        }
        return e.value.text ? sse(chunk({ text: e.value.text }, null)) : true;
      },
    });
    res.on("drain", () => call.drained());
    // The client went away before the answer was complete: the generation stops.
    res.on("close", () => {
      if (!res.writableFinished) call.cancel();
    });

    try {
      await call.done;
    } catch (st) {
      const err = fromGrpcStatus(st as StatusObject);
      if (res.destroyed) return;
      // A session another pod holds: 421 Misdirected Request naming that pod, for the caller or
      // the gateway to send the request there (the gRPC trailer of the same name, as a header).
      const owner = (st as { metadata?: Metadata }).metadata?.get(SESSION_OWNER_KEY)?.[0];
      if (!opened && typeof owner === "string")
        return sendError(res, new HttpError(421, err.message, null, "session_elsewhere"), { ...headers, [SESSION_OWNER_KEY]: owner });
      if (!opened) return sendError(res, err, headers);
      // Mid-stream: the status line is gone; the error is the stream's last event, behind what
      // the client has not read yet (a client that never reads again is closed by the flush
      // guard after FREEKV_WRITE_STALL_MS, see guardFlush).
      sse(err.body());
      res.end();
      return;
    }
    if (res.destroyed) return;
    const f = final!;
    const usage = { prompt_tokens: f.usage?.promptTokens ?? 0, completion_tokens: f.usage?.completionTokens ?? 0, total_tokens: (f.usage?.promptTokens ?? 0) + (f.usage?.completionTokens ?? 0) };
    const finish = finishReason(f.finishReason);
    if (!r.stream) {
      const choice = chat
        ? { index: 0, message: { role: "assistant", content: text, refusal: null }, logprobs: null, finish_reason: finish }
        : { index: 0, text, logprobs: null, finish_reason: finish };
      return sendJson(res, 200, { id, object: chat ? "chat.completion" : "text_completion", created, model, choices: [choice], usage }, headers);
    }
    if (!opened) {
      open();
      if (chat) sse(chunk({ role: "assistant", text: "" }, null));
    }
    sse(chunk(chat ? {} : { text: "" }, finish));
    if (r.includeUsage) sse({ id, object, created, model, choices: [], usage });
    res.end("data: [DONE]\n\n");
  }

  /**
   * Responses not yet closed, and the sockets requests came on: the drain lets them flush before
   * it closes their connections (a response is finished once its last bytes are handed to its
   * socket, which may still hold them for a slow reader).
   */
  const responses = new Set<ServerResponse>();
  const sockets = new Set<Socket>();

  /**
   * An ended response that the client has not read to its end is closed if it is still not
   * flushed after FREEKV_WRITE_STALL_MS: a reader that stopped does not hold its socket and
   * buffers forever.
   */
  const guardFlush = (res: ServerResponse): void => {
    const stallMs = opts.writeStallMs ?? 0;
    if (stallMs <= 0 || res.writableFinished || res.destroyed) return;
    const timer = setTimeout(() => {
      if (res.writableFinished) return;
      log.info({ stallMs }, "OpenAI front: a client stopped reading the end of its response; closed");
      res.destroy();
    }, stallMs);
    timer.unref();
    const clear = () => clearTimeout(timer);
    res.once("finish", clear);
    res.once("close", clear);
  };

  const handle = (req: IncomingMessage, res: ServerResponse): void => {
    responses.add(res);
    res.once("close", () => responses.delete(res));
    const socket = req.socket;
    if (!sockets.has(socket)) {
      sockets.add(socket);
      socket.once("close", () => sockets.delete(socket));
    }
    route(req, res).then(
      () => guardFlush(res),
      (e: unknown) => {
        const err = e instanceof HttpError ? e : new HttpError(500, `internal error: ${(e as Error).message}`);
        if (!(e instanceof HttpError)) log.error({ err: e, url: req.url }, "OpenAI front: internal error");
        if (res.headersSent) {
          res.destroy();
          return;
        }
        sendError(res, err);
        guardFlush(res);
      },
    );
  };
  const server: Server = opts.tls ? createHttpsServer(opts.tls, handle) : createServer(handle);

  return {
    server,
    listen(host, port) {
      return new Promise((resolve, reject) => {
        const failed = (e: Error) => reject(new Error(`cannot listen on ${host}:${port}: ${e.message}`));
        server.once("error", failed);
        server.listen(port, host, () => {
          server.removeListener("error", failed);
          // Once listening, a server error (a failed accept: out of file descriptors) is logged;
          // without a listener it would end the process.
          const a = server.address();
          const actual = typeof a === "object" && a ? a.port : port;
          server.on("error", (e) => log.error({ err: e.message, port: actual }, "OpenAI front: server error"));
          resolve(actual);
        });
      });
    },
    async close(waitMs = 5_000) {
      // Waited for before server.close(), which closes connections it deems idle: one whose
      // response is finished but still in its socket's buffer would lose its tail. New requests
      // meanwhile get 503 (the service no longer serves).
      const flushing = () => [...responses].filter((r) => !r.writableFinished).length + [...sockets].filter((k) => !k.destroyed && k.writableLength > 0).length;
      const t0 = Date.now();
      while (flushing() > 0 && Date.now() - t0 < waitMs) await new Promise((r) => setTimeout(r, 20));
      const left = flushing();
      if (left > 0) log.warn({ waitedMs: Date.now() - t0, responses: left }, "OpenAI front: responses still unread by their clients are cut at the drain");
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      server.closeAllConnections();
      await closed;
    },
  };
}
