/** A bad environment variable stops a service at start, non-zero, with a message naming it. */
import { networkInterfaces } from "node:os";
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
    // Blanks are not "unset" (nor, through Number(), 0), and numbers are decimal digits only.
    ["kvstore", { FREEKV_KVSTORE_PORT: " " }, /FREEKV_KVSTORE_PORT=" ": is blank/],
    ["kvstore", { FREEKV_KVSTORE_PORT: "0", FREEKV_KVSTORE_METRICS_PORT: "0", FREEKV_KVSTORE_CAPACITY_BYTES: "1e9" }, /FREEKV_KVSTORE_CAPACITY_BYTES="1e9": must be an integer in decimal digits/],
    // Read by the addon too (strtol(..., 10) would take 0x40000 as 0 and 1e6 as 1).
    ["kvstore", { FREEKV_KVSTORE_PORT: "0", FREEKV_KVSTORE_METRICS_PORT: "0", FREEKV_MALLOC_MMAP_THRESHOLD: "0x40000" }, /FREEKV_MALLOC_MMAP_THRESHOLD="0x40000": must be an integer in decimal digits, 0\.\.33554432/],
    // The addon would throw at the first CUDA session instead.
    ["compute", { FREEKV_REGISTER_THREADS: "8.0" }, /FREEKV_REGISTER_THREADS="8\.0": must be an integer in decimal digits, 1\.\.64/],
  ];
  for (const [svc, env, re] of cases) {
    it(`${svc}: ${Object.entries(env).at(-1)!.join("=")}`, async () => {
      const msg = await failure(svc, env);
      expect(msg).toMatch(/exited \(code 2, signal null\)/);
      expect(msg).toMatch(re);
    });
  }
});

describe("credentials in the directory URL", () => {
  it("are masked when the directory cannot be opened", async () => {
    const msg = await failure("kvstore", { FREEKV_KVSTORE_PORT: "0", FREEKV_KVSTORE_METRICS_PORT: "0", FREEKV_DIRECTORY: "redis://:s3cretPW@127.0.0.1:1/0" });
    expect(msg).toMatch(/exited \(code 2, signal null\)/);
    expect(msg).toContain("kvstore: FREEKV_DIRECTORY=redis://:***@127.0.0.1:1/0: ");
    expect(msg).not.toContain("s3cretPW");
  });

  it("are masked in a refused value", async () => {
    const msg = await failure("kvstore", { FREEKV_KVSTORE_PORT: "0", FREEKV_KVSTORE_METRICS_PORT: "0", FREEKV_DIRECTORY: "etcd://admin:s3cretPW@etcd:2379" });
    expect(msg).toMatch(/exited \(code 2, signal null\)/);
    expect(msg).toContain('FREEKV_DIRECTORY="etcd://admin:***@etcd:2379": must be "memory" or a redis:// URL');
    expect(msg).not.toContain("s3cretPW");
  });
});

describe("misspelt variables", () => {
  it("are named in a warning at start, with the closest known name; the other service's are not", async () => {
    const p = await startService("kvstore", {
      env: { FREEKV_LOG_LEVEL: "warn", FREEKV_KVSTORE_PORT: "0", FREEKV_KVSTORE_METRICS_PORT: "0", FREEKV_KVSTORE_CAPACITY: "1000", FREEKV_BACKEND: "cpu", FREEKV_ADVERTISE_ADDRESS: "10.0.0.1:50051" },
      timeoutMs: 20000,
      serving: false,
    });
    await p.stop("SIGKILL");
    const warnings = p.output.filter((l) => l.startsWith("{")).map((l) => JSON.parse(l) as Record<string, unknown>).filter((l) => l.level === "warn" && typeof l.variable === "string");
    expect(warnings.filter((w) => w.variable === "FREEKV_KVSTORE_CAPACITY")).toEqual([
      expect.objectContaining({
        service: "kvstore",
        closest: ["FREEKV_KVSTORE_CAPACITY_BYTES"],
        msg: "FREEKV_KVSTORE_CAPACITY is not a setting of the compute or the kvstore and is ignored: did you mean FREEKV_KVSTORE_CAPACITY_BYTES?",
      }),
    ]);
    // The compute's variables, from a ConfigMap both containers share.
    expect(warnings.filter((w) => w.variable === "FREEKV_BACKEND" || w.variable === "FREEKV_ADVERTISE_ADDRESS")).toEqual([]);
  });

  it("are named beside a configuration error", async () => {
    const msg = await failure("compute", { FREEKV_THREDS: "2", FREEKV_KVSTORE_CAPACITY_BYTES: "1000", FREEKV_BACKEND: "tpu" });
    expect(msg).toMatch(/exited \(code 2, signal null\)/);
    expect(msg).toContain("compute: FREEKV_THREDS is not a setting of the compute or the kvstore and is ignored: did you mean FREEKV_THREADS?");
    expect(msg).not.toMatch(/FREEKV_KVSTORE_CAPACITY_BYTES is not/);
  });
});

// The loopback's IPv6 address, where the host has one.
const ipv6 = Object.values(networkInterfaces()).some((list) => list?.some((a) => a.family === "IPv6" && a.address === "::1"));

describe.skipIf(!ipv6)("IPv6", () => {
  it("a kvstore listens on a bare IPv6 host; compute reaches it at a bracketed address and advertises one", async () => {
    const kvstore = await startService("kvstore", { env: { FREEKV_LOG_LEVEL: "warn", FREEKV_KVSTORE_HOST: "::1", FREEKV_KVSTORE_METRICS_HOST: "::1", FREEKV_KVSTORE_PORT: "0", FREEKV_KVSTORE_METRICS_PORT: "0" }, timeoutMs: 20000 });
    try {
      expect(kvstore.address).toBe(`[::1]:${kvstore.grpcPort}`);
      const addr = kvstore.address;
      const compute = await startService("compute", {
        env: { FREEKV_LOG_LEVEL: "warn", FREEKV_COMPUTE_PORT: "0", FREEKV_COMPUTE_METRICS_PORT: "0", FREEKV_MODEL: "none", FREEKV_KVSTORE_ADDR: addr, FREEKV_ADVERTISE_ADDRESS: "[fd00::5]:50051", FREEKV_DRAIN_HANDOFF: "[fd00::6]:50051" },
        timeoutMs: 30000,
      });
      await compute.stop("SIGKILL");
    } finally {
      await kvstore.stop("SIGKILL");
    }
  });
});
