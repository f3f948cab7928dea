/**
 * The `freekv fidelity` and `freekv trace` commands as users meet them: malformed traces and bad
 * options give exit code 2 and a message naming the problem; --json prints exactly the
 * documented object; `trace synth` reports its facts and reproduces the committed fixture.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { run as fidelity } from "../../tools/cli/fidelity.js";
import { run as trace } from "../../tools/cli/trace.js";
import { writeSafetensors, type TensorToWrite } from "../../services/compute/model/safetensors.js";
import { loadTrace } from "../../tools/fidelity/trace.js";
import { synthesizeTrace } from "../../tools/fidelity/synth.js";
import { Prng } from "../../tools/fidelity/random.js";

const ROOT = join(import.meta.dirname, "..", "..");
const FIXTURE = join(ROOT, "test", "fixtures", "traces", "small-bf16.safetensors");
let dir: string;

async function capture(fn: () => Promise<number>): Promise<{ code: number; out: string; err: string }> {
  const out: string[] = [];
  const err: string[] = [];
  const ow = process.stdout.write.bind(process.stdout);
  const ew = process.stderr.write.bind(process.stderr);
  process.stdout.write = ((s: string | Uint8Array) => (out.push(String(s)), true)) as typeof process.stdout.write;
  process.stderr.write = ((s: string | Uint8Array) => (err.push(String(s)), true)) as typeof process.stderr.write;
  try {
    const code = await fn();
    return { code, out: out.join(""), err: err.join("") };
  } finally {
    process.stdout.write = ow;
    process.stderr.write = ew;
  }
}

function f32(n: number, seed: number): Float32Array {
  const r = new Prng(seed);
  return Float32Array.from({ length: n }, () => r.gaussian());
}

/** A well-formed trace's tensors (N=64, T=4, Hq=2, Hkv=1, D=8) to break one way at a time. */
function parts(): Record<string, TensorToWrite> {
  return {
    q: { dtype: "F32", shape: [4, 2, 8], data: f32(64, 1) },
    k: { dtype: "F32", shape: [68, 1, 8], data: f32(544, 2) },
    v: { dtype: "F32", shape: [68, 1, 8], data: f32(544, 3) },
  };
}

function write(name: string, tensors: Record<string, TensorToWrite>, meta: Record<string, string> = { prompt_len: "64", name }): string {
  const file = join(dir, `${name}.safetensors`);
  writeSafetensors(file, tensors, meta);
  return file;
}

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "freekv-fidelity-cli-"));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("freekv fidelity: malformed traces", () => {
  const cases: Array<[string, () => string, RegExp]> = [
    ["missing tensor", () => { const p = parts(); delete (p as Record<string, unknown>).v; return write("missing-v", p); }, /missing tensor 'v'/],
    ["wrong rank", () => write("rank", { ...parts(), q: { dtype: "F32", shape: [4, 16], data: f32(64, 1) } }), /tensor 'q' has rank 2/],
    ["k and v disagree", () => write("kv", { ...parts(), v: { dtype: "F32", shape: [68, 1, 4], data: f32(272, 3) } }), /'v' has shape \[68,1,4\] but 'k' has shape \[68,1,8\]/],
    ["head dims disagree", () => write("dims", { ...parts(), q: { dtype: "F32", shape: [4, 1, 16], data: f32(64, 1) } }), /head dim disagrees: q has D=16, k has D=8/],
    ["heads not grouped", () => write("heads", { ...parts(), k: { dtype: "F32", shape: [68, 3, 8], data: f32(68 * 24, 2) }, v: { dtype: "F32", shape: [68, 3, 8], data: f32(68 * 24, 3) } }), /q heads \(2\) must be a multiple of k\/v heads \(3\)/],
    ["prompt_len missing", () => write("nolen", parts(), { name: "x" }), /metadata 'prompt_len' is missing/],
    ["prompt_len too large", () => write("biglen", parts(), { prompt_len: "65", name: "x" }), /'prompt_len' \(65\) is too large: k has 68 tokens/],
    ["prompt_len not a number", () => write("badlen", parts(), { prompt_len: "sixty", name: "x" }), /'prompt_len' must be a positive integer \(got 'sixty'\)/],
    ["prompt_len too small for k", () => write("smalllen", parts(), { prompt_len: "60", name: "x" }), /k has 68 tokens but prompt_len \+ steps = 60 \+ 4 = 64/],
    ["integer dtype", () => write("int", { ...parts(), k: { dtype: "I32", shape: [68, 1, 8], data: new Int32Array(544) } }), /tensor 'k' has dtype I32/],
    ["non-finite value", () => { const p = parts(); (p.k.data as Float32Array)[77] = NaN; return write("nan", p); }, /tensor 'k' has a non-finite value at flat index 77/],
    ["not safetensors", () => { const f = join(dir, "junk.safetensors"); writeFileSync(f, "hello, not a trace"); return f; }, /not a readable safetensors file/],
    ["no such file", () => join(dir, "nope.safetensors"), /no such file/],
  ];
  it.each(cases)("%s: exit code 2 and a message naming it", async (_name, make, message) => {
    const file = make();
    const r = await capture(() => fidelity(["--trace", file, "--engine", "model"]));
    expect(r.code).toBe(2);
    expect(r.err).toMatch(message);
    expect(r.err).toContain(file);
    expect(r.out).toBe("");
  });

  it("the well-formed version of the same trace replays", async () => {
    const r = await capture(() => fidelity(["--trace", write("good", parts()), "--engine", "model", "--page-size", "8", "--sink", "8", "--window", "8", "--select", "16"]));
    expect(r.err).toBe("");
    expect(r.code).toBe(0);
    expect(r.out).toMatch(/mass_recall/);
  });

  it("bad options: exit code 2 naming the option", async () => {
    const file = FIXTURE;
    for (const [args, msg] of [
      [["--engine", "model"], /--trace FILE is required/],
      [["--trace", file, "--modes", "freekv,bogus"], /--modes: unknown mode 'bogus'/],
      [["--trace", file, "--select", "100"], /--select \(100\) must be a multiple of --page-size \(32\)/],
      [["--trace", file, "--tau", "high"], /--tau must be a number/],
      [["--trace", file, "--page-size", "0"], /--page-size must be an integer >= 1/],
      [["--trace", file, "--engine", "gpu"], /--engine must be native or model/],
      [["--trace", file, "--kv-dtype", "f16"], /--kv-dtype must be f32 or bf16/],
      [["--trace", file, "--recall", "memcpy"], /--recall must be gather or double_buffer/],
      [["--trace", file, "--frobnicate"], /Unknown option '--frobnicate'/],
    ] as const) {
      const r = await capture(() => fidelity([...args]));
      expect(r.code, args.join(" ")).toBe(2);
      expect(r.err).toMatch(msg);
    }
  });

  it("exits with code 2 through the freekv binary too", () => {
    const tsx = join(ROOT, "node_modules", ".bin", "tsx");
    const r = spawnSync(tsx, [join(ROOT, "tools/cli/main.ts"), "fidelity", "--trace", join(dir, "absent.safetensors")], { encoding: "utf8" });
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/absent\.safetensors: no such file/);
  });
});

describe("freekv fidelity --json", () => {
  it("prints exactly {modes: {<mode>: {mass_recall, rel_error, correction_rate, recall_bytes_per_step}}}", async () => {
    const r = await capture(() => fidelity(["--trace", FIXTURE, "--engine", "model", "--modes", "oracle,sink_window,freekv", "--select", "128", "--json"]));
    expect(r.code).toBe(0);
    expect(r.err).toBe(""); // no progress bar when stderr is not a terminal
    const lines = r.out.trim().split("\n");
    expect(lines).toHaveLength(1);
    const j = JSON.parse(lines[0]);
    expect(Object.keys(j)).toEqual(["modes"]);
    expect(Object.keys(j.modes).sort()).toEqual(["freekv", "oracle", "sink_window"]);
    for (const m of Object.values(j.modes) as Record<string, number>[]) {
      expect(Object.keys(m).sort()).toEqual(["correction_rate", "mass_recall", "recall_bytes_per_step", "rel_error"]);
      for (const x of Object.values(m)) expect(Number.isFinite(x)).toBe(true);
      expect(m.mass_recall).toBeGreaterThan(0);
      expect(m.mass_recall).toBeLessThanOrEqual(1 + 1e-9);
    }
    expect(j.modes.sink_window.recall_bytes_per_step).toBe(0);
    expect(j.modes.oracle.mass_recall).toBeGreaterThan(j.modes.sink_window.mass_recall);
  });
});

describe("freekv fidelity --per-step", () => {
  it("writes one CSV row per step whose mean is the reported mass recall", async () => {
    const csv = join(dir, "steps.csv");
    const r = await capture(() => fidelity(["--trace", FIXTURE, "--engine", "model", "--modes", "oracle,speculative", "--select", "128", "--json", "--per-step", csv]));
    expect(r.code).toBe(0);
    const j = JSON.parse(r.out);
    const rows = readFileSync(csv, "utf8").trim().split("\n");
    expect(rows[0]).toBe("step,cos_kv0,mass_oracle,mass_speculative");
    expect(rows).toHaveLength(1 + 16);
    const col = (i: number) => rows.slice(1).map((l) => Number(l.split(",")[i]));
    const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
    expect(mean(col(2))).toBeCloseTo(j.modes.oracle.mass_recall, 5);
    expect(mean(col(3))).toBeCloseTo(j.modes.speculative.mass_recall, 5);
    expect(rows[1].split(",")[1]).toBe("");
    for (const c of col(1).slice(1)) expect(c).toBeGreaterThan(-1);
  });
});

describe("freekv trace synth", () => {
  it("writes a loadable trace and reports cosine, peakedness, jumps and needles", async () => {
    const out = join(dir, "synth.safetensors");
    const r = await capture(() => trace(["synth", "--out", out, "--prompt-len", "2048", "--steps", "12", "--q-heads", "4", "--kv-heads", "2", "--head-dim", "32", "--seed", "4", "--json"]));
    expect(r.code).toBe(0);
    const facts = JSON.parse(r.out);
    expect(facts.peakedness.budget_fraction).toBe(0.08);
    expect(facts.peakedness.top_page_mass).toBeGreaterThan(0.5);
    expect(facts.adjacent_cosine.mean).toBeGreaterThan(0.5);
    expect(facts.needles).toHaveLength(4);
    const tr = loadTrace(out);
    expect([tr.promptLen, tr.steps, tr.qHeads, tr.kvHeads, tr.headDim, tr.dtype]).toEqual([2048, 12, 4, 2, 32, "F32"]);
    expect(tr.name).toBe("synthetic-4");
    expect(Number(tr.metadata.top_page_mass)).toBeCloseTo(facts.peakedness.top_page_mass, 3);
    const text = await capture(() => trace(["synth", "--out", out, "--prompt-len", "2048", "--steps", "12"]));
    expect(text.out).toMatch(/exact top 8% pages hold \d+\.\d% of the softmax mass/);
    expect(text.out).toMatch(/adjacent query cosine \(group mean\): mean 0\.\d+/);
  });

  it("bad options: exit code 2 naming the option", async () => {
    for (const [args, msg] of [
      [["synth"], /--out FILE is required/],
      [["synth", "--out", join(dir, "x"), "--dtype", "f16"], /--dtype must be f32 or bf16/],
      [["synth", "--out", join(dir, "x"), "--q-heads", "6", "--kv-heads", "4"], /--q-heads \(6\) must be a multiple of --kv-heads \(4\)/],
      [["synth", "--out", join(dir, "x"), "--steps", "ten"], /--steps must be an integer/],
      [["make", "--out", join(dir, "x")], /unknown subcommand 'make'/],
    ] as const) {
      const r = await capture(() => trace([...args]));
      expect(r.code, args.join(" ")).toBe(2);
      expect(r.err).toMatch(msg);
    }
  });

  it("regenerates the committed fixture byte for byte (make.sh's arguments)", async () => {
    const script = readFileSync(join(ROOT, "test", "fixtures", "traces", "make.sh"), "utf8");
    const args = /SMALL_ARGS="([^"]+)"/.exec(script)![1].split(/\s+/);
    const out = join(dir, "again.safetensors");
    const r = await capture(() => trace(["synth", "--out", out, ...args]));
    expect(r.code).toBe(0);
    expect(readFileSync(out).equals(readFileSync(FIXTURE))).toBe(true);
    const tr = loadTrace(FIXTURE);
    expect(tr.dtype).toBe("BF16");
    expect([tr.promptLen, tr.steps, tr.qHeads, tr.kvHeads, tr.headDim]).toEqual([1024, 16, 4, 1, 32]);
    // bf16 on disk: every value within half a bf16 ulp of the float32 the synthesiser made
    const fresh = synthesizeTrace(JSON.parse(tr.metadata.synth_options));
    for (const [a, b] of [[tr.q, fresh.q], [tr.k, fresh.k], [tr.v, fresh.v]] as const) {
      expect(a.length).toBe(b.length);
      let worst = 0;
      for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i] - b[i]) / Math.max(Math.abs(b[i]), 1e-30));
      expect(worst).toBeLessThanOrEqual(2 ** -8);
      expect(worst).toBeGreaterThan(0);
    }
  });
});
