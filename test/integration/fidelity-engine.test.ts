/**
 * The "done when" on the native CPU engine, on traces from our own generator:
 * freekv's mass recall within 0.005 of oracle and far above sink_window; speculative measurably
 * below oracle on traces with topic jumps. Also: the engine agrees with the float64 policy
 * model written from the design, dense mode is exact, both recall paths give the same result,
 * and the harness leaves no shared-memory segment behind.
 */
import { describe, expect, it } from "vitest";
import { spawn } from "node:child_process";
import { mkdtempSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { run as fidelityCli } from "../../tools/cli/fidelity.js";
import { loadAddon } from "../../native/binding.js";
import { FIDELITY_DEFAULTS, MODE_NAMES, type ModeName } from "../../tools/fidelity/modes.js";
import { NativeTarget } from "../../tools/fidelity/native-target.js";
import { PolicyModel } from "../../tools/fidelity/policy-model.js";
import { replay } from "../../tools/fidelity/replay.js";
import { synthesizeTrace, type SynthTrace } from "../../tools/fidelity/synth.js";
import { writeTrace } from "../../tools/fidelity/trace.js";

function engineAvailable(): boolean {
  try {
    return typeof loadAddon().Engine === "function";
  } catch {
    return false;
  }
}

const SHAPE = { promptLen: 8192, steps: 64, qHeads: 8, kvHeads: 2, headDim: 64 };

function ourSegments(): string[] {
  return readdirSync("/dev/shm").filter((n) => n.startsWith(`freekv-fidelity-${process.pid}-`));
}

describe.skipIf(!engineAvailable())("fidelity on the native CPU engine", () => {
  const addon = engineAvailable() ? loadAddon() : undefined!;
  const geo = (tr: SynthTrace) => ({ qHeads: tr.qHeads, kvHeads: tr.kvHeads, headDim: tr.headDim, capacityTokens: tr.promptLen + tr.steps });

  it.each([31, 32])("done when: freekv >= oracle - 0.005 >> sink_window, speculative < oracle (seed %i)", async (seed) => {
    const tr = synthesizeTrace({ ...SHAPE, seed });
    expect(tr.jumps.flat().length).toBeGreaterThanOrEqual(4);
    const engine = new addon.Engine({ backend: "cpu", threads: 2 });
    const modes: ModeName[] = [...MODE_NAMES];
    const native = await replay(tr, modes, (m) => NativeTarget.create(addon, engine, m, { ...geo(tr), settings: FIDELITY_DEFAULTS }));
    const n = native.modes as Record<ModeName, { mass_recall: number; rel_error: number; correction_rate: number; recall_bytes_per_step: number }>;
    expect(n.dense.mass_recall).toBeCloseTo(1, 9);
    expect(n.dense.rel_error).toBeLessThan(1e-4);
    expect(n.oracle.mass_recall).toBeGreaterThan(0.9);
    expect(n.freekv.mass_recall).toBeGreaterThanOrEqual(n.oracle.mass_recall - 0.005);
    expect(n.freekv.mass_recall).toBeGreaterThan(n.sink_window.mass_recall + 0.4);
    expect(n.speculative.mass_recall).toBeLessThan(n.oracle.mass_recall - 0.02);
    expect(n.freekv.rel_error).toBeLessThan(n.speculative.rel_error);
    expect(n.freekv.correction_rate).toBeGreaterThan(0);
    expect(n.oracle.correction_rate).toBe(0);
    expect(n.sink_window.recall_bytes_per_step).toBe(0);
    expect(n.freekv.recall_bytes_per_step).toBeGreaterThan(0);
    // speculative's losses are at the jumps: each jump step loses a large share of the mass
    const jumpSteps = [...new Set(tr.jumps.flat())];
    const lossAtJumps = jumpSteps.reduce((a, t) => a + native.perStep.oracle![t] - native.perStep.speculative![t], 0) / jumpSteps.length;
    expect(lossAtJumps).toBeGreaterThan(0.1);

    expect(ourSegments()).toEqual([]);
    if (seed !== 31) return;
    // The engine against the float64 model of the same policy, written from the design (one
    // seed: the float64 replay is the slow part on a small machine).
    const model = await replay(tr, modes, (m) => new PolicyModel(geo(tr), FIDELITY_DEFAULTS, m));
    for (const m of modes) {
      expect(Math.abs(n[m].mass_recall - model.modes[m]!.mass_recall), m).toBeLessThan(2e-3);
      expect(Math.abs(n[m].correction_rate - model.modes[m]!.correction_rate), m).toBeLessThan(0.02);
    }
    expect(ourSegments()).toEqual([]);
  });

  it("double-buffered recall and bf16 storage give the same selection quality", async () => {
    const tr = synthesizeTrace({ ...SHAPE, promptLen: 4096, steps: 32, seed: 33 });
    const engine = new addon.Engine({ backend: "cpu", threads: 2 });
    const modes: ModeName[] = ["oracle", "freekv"];
    const gather = await replay(tr, modes, (m) => NativeTarget.create(addon, engine, m, { ...geo(tr), settings: FIDELITY_DEFAULTS }));
    const dbuf = await replay(tr, modes, (m) => NativeTarget.create(addon, engine, m, { ...geo(tr), settings: FIDELITY_DEFAULTS, recall: "double_buffer" }));
    const bf16 = await replay(tr, modes, (m) => NativeTarget.create(addon, engine, m, { ...geo(tr), settings: FIDELITY_DEFAULTS, kvDtype: "bf16" }));
    for (const m of modes) {
      expect(dbuf.modes[m]!.mass_recall).toBe(gather.modes[m]!.mass_recall);
      expect(dbuf.modes[m]!.rel_error).toBe(gather.modes[m]!.rel_error);
      expect(dbuf.modes[m]!.recall_bytes_per_step).toBe(gather.modes[m]!.recall_bytes_per_step);
      expect(Math.abs(bf16.modes[m]!.mass_recall - gather.modes[m]!.mass_recall)).toBeLessThan(0.01);
      // bf16 storage rounds the cache: a little error on top of the selection's, never less
      expect(bf16.modes[m]!.rel_error).toBeLessThan(gather.modes[m]!.rel_error + 0.02);
      expect(bf16.modes[m]!.rel_error).not.toBe(gather.modes[m]!.rel_error);
    }
    expect(ourSegments()).toEqual([]);
  });

  it("freekv fidelity --json on the committed bf16 fixture: native engine agrees with the policy model", async () => {
    const fixture = join(import.meta.dirname, "..", "fixtures", "traces", "small-bf16.safetensors");
    const args = ["--trace", fixture, "--select", "128", "--sink", "64", "--window", "64", "--json"];
    const runJson = async (extra: string[]) => {
      const out: string[] = [];
      const ow = process.stdout.write.bind(process.stdout);
      process.stdout.write = ((s: string | Uint8Array) => (out.push(String(s)), true)) as typeof process.stdout.write;
      let code: number;
      try {
        code = await fidelityCli([...args, ...extra]);
      } finally {
        process.stdout.write = ow;
      }
      expect(code).toBe(0);
      return JSON.parse(out.join("")).modes as Record<string, Record<string, number>>;
    };
    const native = await runJson(["--threads", "2"]);
    const model = await runJson(["--engine", "model"]);
    expect(Object.keys(native).sort()).toEqual([...MODE_NAMES].sort());
    for (const m of MODE_NAMES) {
      expect(Math.abs(native[m].mass_recall - model[m].mass_recall), m).toBeLessThan(2e-3);
      expect(Math.abs(native[m].rel_error - model[m].rel_error), m).toBeLessThan(1e-3);
    }
    expect(native.oracle.mass_recall).toBeGreaterThan(native.sink_window.mass_recall);
    expect(ourSegments()).toEqual([]);
  });

  it("tau sweeps freekv from speculative (tau = -1) to oracle (tau > 1), corrections rising", async () => {
    const tr = synthesizeTrace({ ...SHAPE, promptLen: 4096, steps: 48, seed: 35 });
    const engine = new addon.Engine({ backend: "cpu", threads: 2 });
    const run = async (tau: number, modes: ModeName[]) =>
      (await replay(tr, modes, (m) => NativeTarget.create(addon, engine, m, { ...geo(tr), settings: { ...FIDELITY_DEFAULTS, selectTokens: 320, tau } }))).modes;
    const base = await run(0.9, ["speculative", "oracle"]);
    const taus = [-1, 0.5, 0.9, 0.97, 1.5];
    const sweep = [];
    for (const tau of taus) sweep.push((await run(tau, ["freekv"])).freekv!);
    expect(sweep[0].correction_rate).toBe(0);
    expect(sweep[0].mass_recall).toBe(base.speculative!.mass_recall);
    expect(sweep[4].correction_rate).toBeCloseTo((tr.steps - 1) / tr.steps, 9);
    expect(sweep[4].mass_recall).toBe(base.oracle!.mass_recall);
    for (let i = 1; i < taus.length; i++) expect(sweep[i].correction_rate).toBeGreaterThanOrEqual(sweep[i - 1].correction_rate);
    expect(sweep[3].correction_rate).toBeGreaterThan(sweep[1].correction_rate);
    expect(base.oracle!.mass_recall - base.speculative!.mass_recall).toBeGreaterThan(0.02);
  });

  it("an interrupted replay leaves no shared-memory segment behind", async () => {
    const dir = mkdtempSync(join(tmpdir(), "freekv-fidelity-int-"));
    try {
      const file = join(dir, "long.safetensors");
      writeTrace(file, synthesizeTrace({ ...SHAPE, promptLen: 16384, steps: 256, seed: 34 }), "F32");
      const mine = () => readdirSync("/dev/shm").filter((n) => n.startsWith("freekv-fidelity-") && !n.startsWith(`freekv-fidelity-${process.pid}-`));
      const before = new Set(mine());
      const root = join(import.meta.dirname, "..", "..");
      const child = spawn(process.execPath, ["--import", "tsx", join(root, "tools/cli/main.ts"), "fidelity", "--trace", file, "--threads", "1"], { cwd: root, stdio: ["ignore", "pipe", "pipe"] });
      const exited = new Promise<number | null>((res) => child.on("exit", (code) => res(code)));
      // wait until its segments exist (all five modes' sessions are created before the replay)
      let seen: string[] = [];
      for (let i = 0; i < 300 && seen.length < 20; i++) {
        await new Promise((r) => setTimeout(r, 100));
        seen = mine().filter((n) => !before.has(n) && n.startsWith(`freekv-fidelity-${child.pid}-`));
      }
      expect(seen.length).toBe(20); // 5 modes x (store, staging, tail, manifest)
      child.kill("SIGINT");
      expect(await exited).toBe(130);
      // Only the child's own segments: another test worker may hold fidelity segments meanwhile.
      expect(mine().filter((n) => !before.has(n) && n.startsWith(`freekv-fidelity-${child.pid}-`))).toEqual([]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
