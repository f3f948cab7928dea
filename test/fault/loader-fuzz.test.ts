/**
 * A seeded fuzz of what a user points the service at: model folders (config.json,
 * generation_config.json, model.safetensors, tokenizer.json) and fidelity traces, each mutated
 * at random from a valid one (random values in random fields, deleted fields, flipped bytes,
 * truncations, forged header lengths, shapes and offsets). Loading must either succeed or throw a
 * typed error whose message names the file or field, never crash the process (the native model
 * is built too), never run past a bounded time, never allocate from a size nobody checked.
 * FREEKV_TEST_SEED replays a run; FREEKV_LOADER_FUZZ sets the number of folders and traces.
 */
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { loadModel, builtinModelDir } from "../../services/compute/model/loader.js";
import { loadTrace, writeTrace } from "../../tools/fidelity/trace.js";
import { prng } from "../helpers/prng.js";

const seed = Number(process.env.FREEKV_TEST_SEED ?? Date.now() % 1e9);
const rand = prng(seed);
const int = (n: number) => Math.floor(rand() * n);
const pick = <T>(xs: readonly T[]): T => xs[int(xs.length)];
/** A fresh copy of one of VALUES: the shared arrays and objects must never be nested into each other or mutated. */
const value = (): unknown => structuredClone(pick(VALUES));
const N = Number(process.env.FREEKV_LOADER_FUZZ ?? 400);
const why = `seed ${seed} (FREEKV_TEST_SEED)`;
const dir = mkdtempSync(join(tmpdir(), "freekv-loader-fuzz-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const ERRORS = new Set(["ModelConfigError", "ModelWeightsError", "SafetensorsError", "TraceError", "RangeError", "TypeError", "Error"]);
const VALUES: unknown[] = [null, -1, 0, 1, 3, 7, 64, 4097, 2 ** 31, 2 ** 32 + 1, 2 ** 53, -(2 ** 53), 1e308, -1e-300, 0.5, "", "abc", "1e9", [], [1, 2], {}, { a: 1 }, true, false];

function mutateJson(text: string): string {
  switch (int(5)) {
    case 0:
      return text.slice(0, int(text.length));
    case 1: {
      const b = Buffer.from(text);
      for (let i = 0, n = 1 + int(4); i < n; i++) b[int(b.length)] = int(256);
      return b.toString("latin1");
    }
    default: {
      let obj: Record<string, unknown>;
      try {
        obj = JSON.parse(text) as Record<string, unknown>;
      } catch {
        return text;
      }
      const keys = Object.keys(obj);
      for (let i = 0, n = 1 + int(3); i < n; i++) {
        const k = rand() < 0.85 && keys.length ? pick(keys) : `x_${int(100)}`;
        if (rand() < 0.2) delete obj[k];
        else if (rand() < 0.2 && obj[k] && typeof obj[k] === "object") (obj[k] as Record<string, unknown>)[pick(["rope_type", "factor", "rope_theta", "x"])] = value();
        else obj[k] = value();
      }
      return JSON.stringify(obj);
    }
  }
}

/** A mutated safetensors file: forged header length, bytes flipped in the header, a truncation, or a forged tensor entry. */
function mutateSafetensors(file: Buffer): Buffer {
  const n = Number(file.readBigUInt64LE(0));
  const b = Buffer.from(file);
  switch (int(4)) {
    case 0:
      b.writeBigUInt64LE(pick([0n, 1n, 7n, BigInt(n - 1), BigInt(n + 1), BigInt(file.length), 2n ** 63n, BigInt(int(2 ** 31))]), 0);
      return b;
    case 1:
      for (let i = 0, k = 1 + int(6); i < k; i++) b[8 + int(n)] = int(256);
      return b;
    case 2:
      return b.subarray(0, int(b.length));
    default: {
      const hdr = JSON.parse(file.subarray(8, 8 + n).toString("utf8")) as Record<string, { dtype: string; shape: unknown; data_offsets: unknown }>;
      const names = Object.keys(hdr).filter((k) => k !== "__metadata__");
      const t = hdr[pick(names)];
      switch (int(4)) {
        case 0:
          t.dtype = pick(["F32", "BF16", "F16", "F64", "I8", "U8", "BOOL", "Q4", ""]);
          break;
        case 1:
          t.shape = pick([[], [0], [-1, 4], [2 ** 31, 2 ** 31], [1e9], ["a"], [1.5, 2], null, [3, 5, 7, 11]]);
          break;
        case 2:
          t.data_offsets = pick([[0, 0], [-4, 0], [0, 2 ** 53], [5, 3], ["a", "b"], [0], null, [int(n), int(n) + 16]]);
          break;
        default:
          delete hdr[pick(names)];
      }
      const json = Buffer.from(JSON.stringify(hdr));
      const len = Buffer.alloc(8);
      len.writeBigUInt64LE(BigInt(json.length), 0);
      return Buffer.concat([len, json, file.subarray(8 + n)]);
    }
  }
}

function expectTyped(e: unknown, what: string): void {
  expect(e, what).toBeInstanceOf(Error);
  const err = e as Error;
  expect(ERRORS.has(err.name), `${what}: ${err.name}: ${err.message}`).toBe(true);
  expect(err.message.length, what).toBeGreaterThan(0);
  expect(err.message.length, what).toBeLessThan(4000);
}

describe(`fuzz of the model loader and the trace reader (${why})`, () => {
  it("mutated model folders load or fail with a typed error; the native model is built from every folder that parses", { timeout: 600_000 }, () => {
    const src = builtinModelDir();
    const files = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"];
    const original = Object.fromEntries(files.map((f) => [f, readFileSync(join(src, f))]));
    const outcomes: Record<string, number> = {};
    for (let i = 0; i < N; i++) {
      const d = join(dir, `m${i % 4}`);
      mkdirSync(d, { recursive: true });
      for (const f of files) writeFileSync(join(d, f), original[f]);
      const target = pick(["config.json", "config.json", "generation_config.json", "model.safetensors", "model.safetensors", "tokenizer.json"]);
      const mutated = target === "model.safetensors" ? mutateSafetensors(original[target]) : Buffer.from(mutateJson(original[target].toString("utf8")), "latin1");
      writeFileSync(join(d, target), mutated);
      const t0 = performance.now();
      try {
        const m = loadModel(d);
        outcomes.loaded = (outcomes.loaded ?? 0) + 1;
        void m;
      } catch (e) {
        expectTyped(e, `folder ${i} (${target} mutated)`);
        const name = (e as Error).name;
        outcomes[name] = (outcomes[name] ?? 0) + 1;
      }
      expect(performance.now() - t0, `folder ${i} (${target}) took too long`).toBeLessThan(20_000);
    }
    console.log(`loader fuzz: ${N} folders: ${JSON.stringify(outcomes)}`);
    expect(Object.values(outcomes).reduce((a, b) => a + b, 0)).toBe(N);
  });

  it("mutated traces load or fail with TraceError", { timeout: 300_000 }, () => {
    const T = 3, P = 20, Hq = 4, Hkv = 2, D = 8;
    const r = () => Float32Array.from({ length: 4096 }, () => rand() * 2 - 1);
    const base = join(dir, "base.safetensors");
    const pool = r();
    writeTrace(base, { name: "fuzz", promptLen: P, steps: T, qHeads: Hq, kvHeads: Hkv, headDim: D, q: pool.slice(0, T * Hq * D), k: pool.slice(0, (P + T) * Hkv * D), v: pool.slice(100, 100 + (P + T) * Hkv * D) }, pick(["F32", "BF16"]));
    const original = readFileSync(base);
    let loaded = 0;
    for (let i = 0; i < N; i++) {
      const f = join(dir, `t${i % 4}.safetensors`);
      writeFileSync(f, mutateSafetensors(original));
      try {
        loadTrace(f);
        loaded++;
      } catch (e) {
        expect((e as Error).name, `trace ${i}: ${(e as Error).message}`).toBe("TraceError");
      }
    }
    copyFileSync(base, join(dir, "t-ok.safetensors"));
    expect(loadTrace(join(dir, "t-ok.safetensors")).promptLen).toBe(P);
    console.log(`trace fuzz: ${N} traces, ${loaded} loaded`);
  });
});
