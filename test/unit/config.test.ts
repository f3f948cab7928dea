/** Env-var configuration: defaults, coercion, and errors that name the variable. */
import { describe, expect, it } from "vitest";
import { ConfigError, parseConfig } from "../../services/common/config.js";
import { computeConfigSchema } from "../../services/compute/config.js";
import { kvstoreConfigSchema } from "../../services/kvstore/config.js";

describe("config", () => {
  it("takes the defaults from an empty environment", () => {
    const k = parseConfig(kvstoreConfigSchema, {});
    expect(k.FREEKV_DIRECTORY).toBe("memory");
    expect(k.FREEKV_KVSTORE_PERSIST).toBe(false);
    expect(k.FREEKV_SCRUB_BYTES_PER_S).toBe(256 << 20);
    const c = parseConfig(computeConfigSchema, {});
    expect(c.FREEKV_BACKEND).toBe("cpu");
    expect(c.FREEKV_DECODE_BATCH_WINDOW_US).toBe(200);
    expect(c.FREEKV_COMMIT_CHECKSUMS).toBe(true);
    expect(c.FREEKV_CUDA_GRAPH).toBe(true);
    expect(c.FREEKV_SIDE_TIMING).toBe(false);
    expect(c.FREEKV_HIERARCHICAL_SELECTION).toBe("auto");
    expect(parseConfig(computeConfigSchema, { FREEKV_HIERARCHICAL_SELECTION: "off" }).FREEKV_HIERARCHICAL_SELECTION).toBe("off");
    expect(() => parseConfig(computeConfigSchema, { FREEKV_HIERARCHICAL_SELECTION: "sometimes" })).toThrow(/FREEKV_HIERARCHICAL_SELECTION="sometimes"/);
    expect(c.FREEKV_QUEUE_ATTEMPTS).toBe(4);
    // Read by the addon itself: validated with its reading (a switch is on for anything but "0").
    expect(c.FREEKV_PREFILL_PROFILE).toBe(false);
    expect(parseConfig(computeConfigSchema, { FREEKV_PREFILL_PROFILE: "1", FREEKV_GEMM_AUTOTUNE: "0" })).toMatchObject({ FREEKV_PREFILL_PROFILE: true, FREEKV_GEMM_AUTOTUNE: false });
    expect(() => parseConfig(computeConfigSchema, { FREEKV_PREFILL_PROFILE: "off" })).toThrow(/FREEKV_PREFILL_PROFILE="off".*any other value would switch it on/);
    // On unless "0" (the addon reads it so too).
    expect(c.FREEKV_SPEC_REUSE).toBe(true);
    expect(parseConfig(computeConfigSchema, { FREEKV_SPEC_REUSE: "0" }).FREEKV_SPEC_REUSE).toBe(false);
    expect(c.FREEKV_MEAN_FOLD).toBe(true);
    expect(parseConfig(computeConfigSchema, { FREEKV_MEAN_FOLD: "0" }).FREEKV_MEAN_FOLD).toBe(false);
    expect(() => parseConfig(computeConfigSchema, { FREEKV_MEAN_FOLD: "yes" })).toThrow(/FREEKV_MEAN_FOLD="yes"/);
    expect(c.FREEKV_RESIDENT_FACTOR).toBe(4);
    expect(parseConfig(computeConfigSchema, { FREEKV_RESIDENT_FACTOR: "2" }).FREEKV_RESIDENT_FACTOR).toBe(2);
    expect(() => parseConfig(computeConfigSchema, { FREEKV_RESIDENT_FACTOR: "9" })).toThrow(/FREEKV_RESIDENT_FACTOR="9"/);
    expect(() => parseConfig(computeConfigSchema, { FREEKV_RESIDENT_FACTOR: "1.5" })).toThrow(/FREEKV_RESIDENT_FACTOR="1.5"/);
    expect(c.FREEKV_REGISTER_THREADS).toBe(8);
    expect(c.FREEKV_PREFILL_OFFLOAD).toBe("copy");
    expect(c.FREEKV_REGISTER_AHEAD).toBe("thread");
    expect(parseConfig(computeConfigSchema, { FREEKV_PREFILL_OFFLOAD: "kernel", FREEKV_REGISTER_AHEAD: "inline" })).toMatchObject({ FREEKV_PREFILL_OFFLOAD: "kernel", FREEKV_REGISTER_AHEAD: "inline" });
    expect(() => parseConfig(computeConfigSchema, { FREEKV_PREFILL_OFFLOAD: "dma" })).toThrow(/FREEKV_PREFILL_OFFLOAD="dma"/);
    expect(() => parseConfig(computeConfigSchema, { FREEKV_REGISTER_AHEAD: "later" })).toThrow(/FREEKV_REGISTER_AHEAD="later"/);
    expect(c.FREEKV_PREFILL_GATE_UP).toBe("bf16");
    expect(parseConfig(computeConfigSchema, { FREEKV_PREFILL_GATE_UP: "f32" }).FREEKV_PREFILL_GATE_UP).toBe("f32");
    expect(() => parseConfig(computeConfigSchema, { FREEKV_PREFILL_GATE_UP: "fp32" })).toThrow(/FREEKV_PREFILL_GATE_UP="fp32"/);
    expect(c.FREEKV_PREFILL_CONTEXT_MEMORY).toBe("malloc");
    expect(parseConfig(computeConfigSchema, { FREEKV_PREFILL_CONTEXT_MEMORY: "pool" }).FREEKV_PREFILL_CONTEXT_MEMORY).toBe("pool");
    expect(() => parseConfig(computeConfigSchema, { FREEKV_PREFILL_CONTEXT_MEMORY: "cache" })).toThrow(/FREEKV_PREFILL_CONTEXT_MEMORY="cache"/);
    expect(c.FREEKV_SESSION_DEVICE_MEMORY).toBe("malloc");
    expect(parseConfig(computeConfigSchema, { FREEKV_SESSION_DEVICE_MEMORY: "pool" }).FREEKV_SESSION_DEVICE_MEMORY).toBe("pool");
    expect(() => parseConfig(computeConfigSchema, { FREEKV_SESSION_DEVICE_MEMORY: "arena" })).toThrow(/FREEKV_SESSION_DEVICE_MEMORY="arena"/);
    expect(() => parseConfig(computeConfigSchema, { FREEKV_REGISTER_THREADS: "0" })).toThrow(/FREEKV_REGISTER_THREADS="0"/);
    expect(c.FREEKV_TEARDOWN_YIELD_MS).toBe(0);
    expect(parseConfig(computeConfigSchema, { FREEKV_TEARDOWN_YIELD_MS: "3000" }).FREEKV_TEARDOWN_YIELD_MS).toBe(3000);
    expect(() => parseConfig(computeConfigSchema, { FREEKV_TEARDOWN_YIELD_MS: "60001" })).toThrow(/FREEKV_TEARDOWN_YIELD_MS="60001"/);
    expect(() => parseConfig(computeConfigSchema, { FREEKV_TEARDOWN_YIELD_MS: "1.5" })).toThrow(/FREEKV_TEARDOWN_YIELD_MS="1.5"/);
    expect(k.FREEKV_MALLOC_MMAP_THRESHOLD).toBe(262144);
    for (const schema of [computeConfigSchema, kvstoreConfigSchema]) expect(() => parseConfig(schema, { FREEKV_MALLOC_MMAP_THRESHOLD: "lots" })).toThrow(/FREEKV_MALLOC_MMAP_THRESHOLD="lots"/);
    expect(() => parseConfig(kvstoreConfigSchema, { FREEKV_MALLOC_MMAP_THRESHOLD: String(64 << 20) })).toThrow(/FREEKV_MALLOC_MMAP_THRESHOLD/);
    expect(parseConfig(computeConfigSchema, { FREEKV_QUEUE_ATTEMPTS: "16" }).FREEKV_QUEUE_ATTEMPTS).toBe(16);
    for (const bad of ["0", "65", "2.5"]) expect(() => parseConfig(computeConfigSchema, { FREEKV_QUEUE_ATTEMPTS: bad })).toThrow(new RegExp(`FREEKV_QUEUE_ATTEMPTS="${bad.replace(".", "\\.")}"`));
    for (const schema of [computeConfigSchema, kvstoreConfigSchema]) {
      expect(parseConfig(schema, {}).FREEKV_WRITE_STALL_MS).toBe(30_000);
      expect(parseConfig(schema, { FREEKV_WRITE_STALL_MS: "0" }).FREEKV_WRITE_STALL_MS).toBe(0);
      expect(() => parseConfig(schema, { FREEKV_WRITE_STALL_MS: "-1" })).toThrow(/FREEKV_WRITE_STALL_MS="-1"/);
    }
  });

  it("coerces numbers and flags, and treats empty values as unset", () => {
    const k = parseConfig(kvstoreConfigSchema, { FREEKV_KVSTORE_PORT: "0", FREEKV_KVSTORE_PERSIST: "yes", FREEKV_KVSTORE_CAPACITY_BYTES: "", FREEKV_DIRECTORY: "redis://127.0.0.1:6379/2" });
    expect(k.FREEKV_KVSTORE_PORT).toBe(0);
    expect(k.FREEKV_KVSTORE_PERSIST).toBe(true);
    expect(k.FREEKV_KVSTORE_CAPACITY_BYTES).toBe(0);
    expect(k.FREEKV_DIRECTORY).toBe("redis://127.0.0.1:6379/2");
    expect(parseConfig(kvstoreConfigSchema, { FREEKV_KVSTORE_PERSIST: "off" }).FREEKV_KVSTORE_PERSIST).toBe(false);
    const g = parseConfig(computeConfigSchema, { FREEKV_CUDA_GRAPH: "0", FREEKV_SIDE_TIMING: "on" });
    expect(g.FREEKV_CUDA_GRAPH).toBe(false);
    expect(g.FREEKV_SIDE_TIMING).toBe(true);
  });

  it("names every bad variable with its value", () => {
    let err: unknown;
    try {
      parseConfig(computeConfigSchema, { FREEKV_COMPUTE_PORT: "http", FREEKV_BACKEND: "gpu", FREEKV_THREADS: "1.5", FREEKV_CUDA_GRAPH: "maybe" });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(ConfigError);
    const problems = (err as ConfigError).problems;
    expect(problems).toHaveLength(4);
    expect(problems.find((p) => p.startsWith('FREEKV_COMPUTE_PORT="http"'))).toBeDefined();
    expect(problems.find((p) => p.startsWith('FREEKV_BACKEND="gpu"'))).toBeDefined();
    expect(problems.find((p) => p.startsWith('FREEKV_THREADS="1.5"'))).toBeDefined();
    expect(problems.find((p) => p.startsWith('FREEKV_CUDA_GRAPH="maybe"'))).toBeDefined();
  });
});
