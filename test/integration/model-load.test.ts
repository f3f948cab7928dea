/**
 * The served model is loaded when compute starts, not by the first request: health is
 * NOT_SERVING until it is ready (Generate and model sessions get UNAVAILABLE meanwhile), then
 * SERVING; a model folder that cannot be loaded leaves the process NOT_SERVING with an error log
 * line saying why (never SERVING with every request failing); and with a real compute process
 * the load is done, and measured, before the first request arrives.
 */
import { randomBytes } from "node:crypto";
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Metadata, status, type ServiceError, type Server } from "@grpc/grpc-js";
import { GenerateRequest, type GenerateResponse } from "../../proto/gen/freekv/v1/compute.js";
import { parseConfig } from "../../services/common/config.js";
import { bindServer } from "../../services/common/lifecycle.js";
import { createLogger } from "../../services/common/log.js";
import { createRegistry } from "../../services/common/metrics.js";
import { computeConfigSchema } from "../../services/compute/config.js";
import { createContext, loadServedModel, type ComputeContext } from "../../services/compute/context.js";
import { loadModelAsync } from "../../services/compute/model/loader.js";
import { createComputeServer } from "../../services/compute/server.js";
import { healthCheck } from "../helpers/grpc-probes.js";
import { QUIET, computeClient, fetchMetrics, metricValue, startService, startTiers, unaryError, type ServiceProcess } from "../helpers/services.js";

const MODEL = join(import.meta.dirname, "..", "fixtures", "models", "tiny-llama3");
const golden = JSON.parse(readFileSync(join(MODEL, "golden.json"), "utf8")) as { prompt: number[]; continuation: number[] };

function generate(address: string, req: Partial<GenerateRequest>): Promise<{ tokens: number[]; prefillMs: number }> {
  const client = computeClient(address);
  const stream = client.generate(GenerateRequest.fromPartial(req), new Metadata(), { deadline: Date.now() + 30_000 });
  const tokens: number[] = [];
  let prefillMs = -1;
  return new Promise<{ tokens: number[]; prefillMs: number }>((resolve, reject) => {
    stream.on("data", (m: GenerateResponse) => {
      if (m.event?.$case === "chunk") tokens.push(...m.event.value.tokenIds);
      if (m.event?.$case === "final") prefillMs = m.event.value.usage!.prefillMs;
    });
    stream.on("error", reject);
    stream.on("end", () => resolve({ tokens, prefillMs }));
  }).finally(() => client.close());
}

const failure = (p: Promise<unknown>) =>
  p.then(
    () => undefined,
    (e: ServiceError) => e,
  );

const prompt = { $case: "tokens" as const, value: { ids: golden.prompt.slice(0, 60) } };

let kvstore: ServiceProcess;
beforeAll(async () => {
  kvstore = await startService("kvstore", { env: { ...QUIET, FREEKV_KVSTORE_PORT: "0", FREEKV_KVSTORE_METRICS_PORT: "0" } });
});
afterAll(async () => {
  await kvstore?.stop();
});

describe("the served model at start", () => {
  it("in process: NOT_SERVING and UNAVAILABLE while the model loads, SERVING once it is ready", async () => {
    const config = parseConfig(computeConfigSchema, { FREEKV_KVSTORE_ADDR: kvstore.address, FREEKV_MODEL: MODEL, FREEKV_THREADS: "2" });
    const ctx: ComputeContext = createContext(config, createLogger("compute", "silent"), createRegistry("compute"));
    const { server, upstream } = createComputeServer(ctx);
    let srv: Server | undefined = server;
    try {
      const address = `127.0.0.1:${await bindServer(server, "127.0.0.1", 0)}`;
      upstream(true);
      expect(ctx.served.state).toBe("loading");
      expect(await healthCheck(address)).toBe("NOT_SERVING");
      expect(await healthCheck(address, "freekv.v1.ComputeService")).toBe("NOT_SERVING");
      const early = await failure(generate(address, { prompt, maxTokens: 4 }));
      expect(early?.code).toBe(status.UNAVAILABLE);
      expect(early?.details).toMatch(/still loading/);
      const client = computeClient(address);
      const session = await unaryError(client, "createSession", { kind: 1 });
      client.close();
      expect(session.code).toBe(status.UNAVAILABLE);

      // The load waits for the test's go: still NOT_SERVING while it is under way.
      let go!: () => void;
      const gate = new Promise<void>((r) => (go = r));
      const loading = loadServedModel(ctx, async (dir) => {
        await gate;
        return loadModelAsync(dir, { engine: ctx.engine });
      });
      expect(await healthCheck(address)).toBe("NOT_SERVING");
      go();
      expect(await loading).toBe(true);
      expect(await healthCheck(address)).toBe("SERVING");
      const r = await generate(address, { prompt: { $case: "tokens", value: { ids: golden.prompt } }, maxTokens: 6 });
      expect(r.tokens).toEqual(golden.continuation.slice(0, 6));
      // Both conditions: a kvstore that stops serving turns compute NOT_SERVING too.
      upstream(false);
      expect(await healthCheck(address)).toBe("NOT_SERVING");
      upstream(true);
      expect(await healthCheck(address)).toBe("SERVING");
    } finally {
      srv?.forceShutdown();
      srv = undefined;
      await ctx.sessions.shutdown();
      ctx.kvstore.close();
    }
  });

  it("a model folder that cannot be loaded: NOT_SERVING, an error log line saying why, FAILED_PRECONDITION", async () => {
    const dir = mkdtempSync(join(tmpdir(), "freekv-broken-model-"));
    copyFileSync(join(MODEL, "config.json"), join(dir, "config.json"));
    writeFileSync(join(dir, "model.safetensors"), randomBytes(4096)); // not a safetensors file
    const compute = await startService("compute", {
      serving: false,
      env: { FREEKV_LOG_LEVEL: "warn", FREEKV_COMPUTE_PORT: "0", FREEKV_COMPUTE_METRICS_PORT: "0", FREEKV_OPENAI_PORT: "0", FREEKV_KVSTORE_ADDR: kvstore.address, FREEKV_MODEL: dir },
    });
    try {
      const t0 = Date.now();
      let line: string | undefined;
      while (!(line = compute.output.find((l) => l.includes("cannot load the model")))) {
        expect(Date.now() - t0, `no log line about the load:\n${compute.output.join("\n")}`).toBeLessThan(20_000);
        await new Promise((r) => setTimeout(r, 25));
      }
      const entry = JSON.parse(line) as { level: string; msg: string; dir: string };
      expect(entry.level).toBe("error");
      expect(entry.dir).toBe(dir);
      expect(entry.msg).toMatch(/safetensors/);
      expect(entry.msg).toMatch(/NOT_SERVING/);
      expect(await healthCheck(compute.address)).toBe("NOT_SERVING");
      const e = await failure(generate(compute.address, { prompt, maxTokens: 4 }));
      expect(e?.code).toBe(status.FAILED_PRECONDITION);
      expect(e?.details).toMatch(/cannot load the model at .*safetensors/);
      expect(metricValue(await fetchMetrics(compute.metricsPort), "freekv_compute_model_ready")).toBe(0);
      // The OpenAI front says the same: 500 with the reason, not 503 "retry later" forever.
      const r = await fetch(`http://127.0.0.1:${compute.openaiPort}/v1/completions`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ prompt: "x", max_tokens: 2 }) });
      expect(r.status).toBe(500);
      const body = (await r.json()) as { error: { code: string; message: string } };
      expect(body.error.code).toBe("model_load_failed");
      expect(body.error.message).toMatch(/^the model could not be loaded, .*safetensors/);
      expect(r.headers.get("retry-after")).toBeNull();
    } finally {
      await compute.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("a real compute process: the model is loaded, and measured, before the first request", async () => {
    const tiers = await startTiers({ kvstoreEnv: QUIET, computeEnv: { FREEKV_LOG_LEVEL: "info", FREEKV_SHUTDOWN_GRACE_MS: "3000", FREEKV_MODEL: MODEL, FREEKV_THREADS: "2" } });
    try {
      // SERVING (startTiers waited for it) means loaded: the log says so, with the time it took,
      // and so do the metrics, before any request was sent.
      const loadedLines = () => tiers.compute.output.filter((l) => l.includes('"msg":"model loaded"'));
      expect(loadedLines()).toHaveLength(1);
      const loadMs = (JSON.parse(loadedLines()[0]) as { loadMs: number }).loadMs;
      expect(loadMs).toBeGreaterThanOrEqual(0);
      const m = await fetchMetrics(tiers.compute.metricsPort);
      expect(metricValue(m, "freekv_compute_model_ready")).toBe(1);
      expect(metricValue(m, "freekv_compute_model_load_seconds")).toBeGreaterThan(0);
      expect(metricValue(m, "freekv_generate_requests_total")).toBeUndefined();
      const first = await generate(tiers.compute.address, { prompt: { $case: "tokens", value: { ids: golden.prompt } }, maxTokens: 5 });
      expect(first.tokens).toEqual(golden.continuation.slice(0, 5));
      expect(first.prefillMs).toBeGreaterThan(0);
      // No request loads it again.
      expect(loadedLines()).toHaveLength(1);
      // This folder has no tokenizer.json: stop strings cannot be matched, and are refused, not ignored.
      const e = await failure(generate(tiers.compute.address, { prompt: { $case: "tokens", value: { ids: golden.prompt } }, maxTokens: 5, stopStrings: ["x"] }));
      expect(e?.code).toBe(status.FAILED_PRECONDITION);
      expect(e?.details).toBe("stop_strings: the served model has no tokenizer.json to decode its output with; use stop_token_ids");
    } finally {
      await tiers.stop();
    }
  });
});
