/** A bad environment variable stops a service at start, non-zero, with a message naming it. */
import { describe, expect, it } from "vitest";
import { startService } from "../helpers/services.js";

async function failure(name: "kvstore" | "compute", env: Record<string, string>): Promise<string> {
  try {
    const p = await startService(name, { env: { FREEKV_LOG_LEVEL: "warn", ...env }, timeoutMs: 20000 });
    await p.stop("SIGKILL");
  } catch (e) {
    return (e as Error).message;
  }
  throw new Error(`${name} started with ${JSON.stringify(env)}`);
}

describe("bad configuration", () => {
  const cases: Array<["kvstore" | "compute", Record<string, string>, RegExp]> = [
    ["kvstore", { FREEKV_KVSTORE_PORT: "70000" }, /FREEKV_KVSTORE_PORT="70000": must be 0\.\.65535/],
    ["kvstore", { FREEKV_KVSTORE_PORT: "0", FREEKV_KVSTORE_METRICS_PORT: "0", FREEKV_KVSTORE_CAPACITY_BYTES: "lots" }, /FREEKV_KVSTORE_CAPACITY_BYTES="lots"/],
    ["kvstore", { FREEKV_KVSTORE_PORT: "0", FREEKV_KVSTORE_METRICS_PORT: "0", FREEKV_DIRECTORY: "etcd://x" }, /FREEKV_DIRECTORY="etcd:\/\/x": must be "memory" or a redis:\/\/ URL/],
    ["kvstore", { FREEKV_KVSTORE_PORT: "0", FREEKV_KVSTORE_METRICS_PORT: "0", FREEKV_KVSTORE_PERSIST: "maybe" }, /FREEKV_KVSTORE_PERSIST="maybe"/],
    ["compute", { FREEKV_BACKEND: "tpu" }, /FREEKV_BACKEND="tpu": must be "cpu" or "cuda"/],
    ["compute", { FREEKV_KVSTORE_ADDR: "nowhere" }, /FREEKV_KVSTORE_ADDR="nowhere": must be host:port/],
    ["compute", { FREEKV_DEVICE_WEIGHTS: "fp8" }, /FREEKV_DEVICE_WEIGHTS="fp8": must be "auto", "bf16" or "f32"/],
    ["compute", { FREEKV_DECODE_BATCH_WINDOW_US: "-5" }, /FREEKV_DECODE_BATCH_WINDOW_US="-5"/],
    ["compute", { FREEKV_PREFILL_ORDER: "fifo" }, /FREEKV_PREFILL_ORDER="fifo": must be "arrival" or "turns"/],
    ["compute", { FREEKV_QUEUE_BACKFILL_MS: "-1" }, /FREEKV_QUEUE_BACKFILL_MS="-1"/],
    ["compute", { FREEKV_SESSION_IDLE_TIMEOUT_S: "-1" }, /FREEKV_SESSION_IDLE_TIMEOUT_S="-1": must be >= 0/],
    ["compute", { FREEKV_EXCHANGE_CAPACITY_BYTES: "0" }, /FREEKV_EXCHANGE_CAPACITY_BYTES="0": must be > 0/],
    ["compute", { FREEKV_EXCHANGE_CAPACITY_BYTES: String(2 ** 52) }, /FREEKV_EXCHANGE_CAPACITY_BYTES=4503599627370496 is more than \/dev\/shm holds/],
    ["compute", { FREEKV_COMPUTE_PORT: "0", FREEKV_COMPUTE_METRICS_PORT: "0", FREEKV_KVSTORE_ADDR: "127.0.0.1:1", FREEKV_KVSTORE_TIMEOUT_MS: "500" }, /FREEKV_KVSTORE_ADDR=127\.0\.0\.1:1: kvstore not reachable/],
  ];
  for (const [svc, env, re] of cases) {
    it(`${svc}: ${Object.entries(env).at(-1)!.join("=")}`, async () => {
      const msg = await failure(svc, env);
      expect(msg).toMatch(/exited \(code 2, signal null\)/);
      expect(msg).toMatch(re);
    });
  }
});
