/**
 * A client that stays connected but stops reading, across real processes (the tiny Qwen2 fixture
 * without an EOS token, so that a generation runs to max_tokens; random prompts). The client is
 * plain HTTP/2 speaking gRPC's framing, as clients that keep HTTP/2 flow control do (grpc-js's
 * client buffers every message it is sent whether or not it is read, so it never stalls a server).
 * With one running slot and FREEKV_WRITE_STALL_MS short, a Generate whose client reads nothing
 * fills its stream's window, and after the limit the call ends: its slot goes to the next
 * request (which completes), it is counted as write_stalled, and the client, once it reads again,
 * gets what was sent and then DEADLINE_EXCEEDED naming the setting. A client that reads in bursts
 * with pauses shorter than the limit is not cut off.
 */
import { rmSync } from "node:fs";
import { connect, type ClientHttp2Session, type ClientHttp2Stream } from "node:http2";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { status } from "@grpc/grpc-js";
import { GenerateRequest, GenerateResponse } from "../../proto/gen/freekv/v1/compute.js";
import { QUIET, fetchMetrics, metricValue, startTiers, type Tiers } from "../helpers/services.js";
import { prng } from "../helpers/prng.js";
import { tinyModelWithoutEos } from "../helpers/tiny-model.js";

const seed = Number(process.env.FREEKV_TEST_SEED) || (Date.now() ^ (process.pid << 12)) >>> 0;
const rand = prng(seed);
const STALL_MS = 400;
// Enough tokens that their chunks overrun the stream's HTTP/2 window (64 KiB) and the server's
// buffers many times over (a chunk message is some 20-40 bytes).
const LONG = 12_000;

let tiers: Tiers;
let h2: ClientHttp2Session;
let modelDir: string;

beforeAll(async () => {
  modelDir = tinyModelWithoutEos("freekv-stall-model-");
  tiers = await startTiers({
    kvstoreEnv: QUIET,
    computeEnv: { ...QUIET, FREEKV_MODEL: modelDir, FREEKV_THREADS: "1", FREEKV_MAX_RUNNING_REQUESTS: "1", FREEKV_WRITE_STALL_MS: String(STALL_MS), FREEKV_MAX_CONTEXT_TOKENS: "16384" },
  });
  h2 = connect(`http://${tiers.compute.address}`);
  h2.on("error", () => {}); // the services' shutdown at the end (GOAWAY)
});

afterAll(async () => {
  h2?.close();
  await tiers?.stop();
  if (modelDir) rmSync(modelDir, { recursive: true, force: true });
});

const randomPrompt = (n: number) => ({ $case: "tokens" as const, value: { ids: Array.from({ length: n }, () => Math.floor(rand() * 320)) } });
const greedy = { temperature: 0, topP: 0, topK: 0, seed: 0 };

interface Read {
  tokens: number;
  final: boolean;
  code?: number;
  details?: string;
}

/** Starts a Generate over plain HTTP/2 (gRPC's length-prefixed framing); nothing is read until `read`. */
function start(h2: ClientHttp2Session, maxTokens: number): ClientHttp2Stream {
  const msg = GenerateRequest.encode(GenerateRequest.fromPartial({ prompt: randomPrompt(16), maxTokens, sampling: greedy })).finish();
  const framed = Buffer.alloc(5 + msg.length);
  framed.writeUInt32BE(msg.length, 1);
  framed.set(msg, 5);
  const stream = h2.request({ ":method": "POST", ":path": "/freekv.v1.ComputeService/Generate", "content-type": "application/grpc", te: "trailers", "grpc-timeout": "120S" });
  stream.pause();
  stream.end(framed);
  return stream;
}

/**
 * Reads the call to its end: the messages, then the status (trailers, or headers for a
 * trailers-only answer). `pauseEveryBytes`: after that many bytes, stops reading for `pauseMs`.
 */
function read(stream: ClientHttp2Stream, pauseEveryBytes = 0, pauseMs = 0): Promise<Read> {
  const r: Read = { tokens: 0, final: false };
  let buf = Buffer.alloc(0);
  let sincePause = 0;
  const takeStatus = (h: Record<string, unknown>) => {
    if (h["grpc-status"] !== undefined) r.code = Number(h["grpc-status"]);
    if (typeof h["grpc-message"] === "string") r.details = decodeURIComponent(h["grpc-message"]);
  };
  return new Promise((resolve, reject) => {
    stream.on("response", takeStatus);
    stream.on("trailers", takeStatus);
    stream.on("data", (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      while (buf.length >= 5 && buf.length >= 5 + buf.readUInt32BE(1)) {
        const n = buf.readUInt32BE(1);
        const m = GenerateResponse.decode(buf.subarray(5, 5 + n));
        buf = buf.subarray(5 + n);
        if (m.event?.$case === "chunk") r.tokens += m.event.value.tokenIds.length;
        else if (m.event?.$case === "final") r.final = true;
      }
      sincePause += d.length;
      if (pauseEveryBytes && sincePause >= pauseEveryBytes) {
        sincePause = 0;
        stream.pause();
        setTimeout(() => stream.resume(), pauseMs);
      }
    });
    stream.on("error", reject);
    stream.on("close", () => resolve(r));
    stream.resume();
  });
}

async function until(what: string, ok: () => Promise<boolean>, timeoutMs = 60_000): Promise<void> {
  const t0 = Date.now();
  while (!(await ok())) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

const metric = async (name: string, labels = "") => metricValue(await fetchMetrics(tiers.compute.metricsPort), name, labels) ?? 0;

describe(`a client that stops reading (seed ${seed})`, () => {
  it("is cut off after FREEKV_WRITE_STALL_MS: its slot goes to the next request, and it reads DEADLINE_EXCEEDED after what was sent", async () => {
    const stalledBefore = await metric("freekv_generate_requests_total", 'finish="write_stalled"');
    // Nothing reads this stream: its window fills and stays full.
    const stuck = start(h2, LONG);
    await until("the stalled call to end", async () => (await metric("freekv_generate_requests_total", 'finish="write_stalled"')) > stalledBefore);
    await until("its running slot to be free", async () => (await metric("vllm:num_requests_running")) === 0, 10_000);
    // The one running slot serves the next request at once.
    const next = await read(start(h2, 8));
    expect(next).toMatchObject({ tokens: 8, final: true, code: status.OK });
    // The stalled client reads again: what the server had sent, then the status.
    const late = await read(stuck);
    expect(late.code).toBe(status.DEADLINE_EXCEEDED);
    expect(late.details).toMatch(/read nothing for 400 ms.*FREEKV_WRITE_STALL_MS/);
    expect(late.tokens).toBeGreaterThan(0);
    expect(late.tokens).toBeLessThan(LONG);
    expect(late.final).toBe(false);
  }, 120_000);

  it("a client that reads in bursts, each pause shorter than the limit, gets its whole answer", async () => {
    const n = 4000 + Math.floor(rand() * 2000);
    const stalledBefore = await metric("freekv_generate_requests_total", 'finish="write_stalled"');
    const r = await read(start(h2, n), 16 * 1024, STALL_MS / 4);
    expect(r).toMatchObject({ tokens: n, final: true, code: status.OK });
    expect(await metric("freekv_generate_requests_total", 'finish="write_stalled"')).toBe(stalledBefore);
  }, 120_000);
});
