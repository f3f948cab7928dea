/**
 * scripts/gpu/ab.sh and scripts/gpu/ab-summary.mjs, the A/B a GPU visit runs: here on the CPU
 * backend with runner-bench's small shape, two variants that differ in their environment
 * (FREEKV_RESIDENT_FACTOR 1 and 4), two rounds. The variants' order must alternate between rounds,
 * each variant's environment must reach its runner, and every figure of the summary must equal one
 * recomputed here from the runs' own runner-bench.json files; a run without its JSON must be named
 * and fail the summary.
 */
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { spawnSync } from "node:child_process";
import { afterAll, describe, expect, it } from "vitest";

const root = join(import.meta.dirname, "..", "..");
const dir = mkdtempSync(join(tmpdir(), "freekv-ab-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

interface Run {
  environment: Record<string, string>;
  results: { batch: number; context: number; mode: string; stepMs: number }[];
}
interface Summary {
  variants: string[];
  rows: { batch: number; context: number; mode: string; variants: Record<string, { steps: { round: number; ms: number }[]; mean: number; vsFirst: number }> }[];
  refRows: { variant: string; mode: string; ratios: { round: number; ratio: number }[]; mean: number }[];
  missing: string[];
}

describe("the GPU A/B script", () => {
  it("alternates the variants' order, passes each its environment and summarises exactly what ran", { timeout: 240_000 }, () => {
    const out = join(dir, "out");
    const r = spawnSync(
      "bash",
      ["scripts/gpu/ab.sh", "--rounds", "2", "--timeout-s", "150", "--ref", "dense",
        "--variant", "f1:FREEKV_RESIDENT_FACTOR=1", "--variant", "f4:FREEKV_RESIDENT_FACTOR=4",
        "--", "--backend", "cpu", "--shape", "small", "--dir", join(dir, "model"), "--points", "1:1024",
        "--modes", "freekv,dense", "--steps", "4", "--warmup", "2"],
      { cwd: root, encoding: "utf8", timeout: 220_000, env: { ...process.env, OUT: out, FREEKV_ADDON: join(root, "native/build/Release/freekv.node") } },
    );
    expect(r.status, `${r.stdout}\n${r.stderr}`).toBe(0);
    const at = (s: string) => r.stdout.indexOf(s);
    const order = ["== round 1, f1", "== round 1, f4", "== round 2, f4", "== round 2, f1"].map(at);
    expect(order.every((i) => i >= 0), r.stdout).toBe(true);
    expect([...order].sort((a, b) => a - b)).toEqual(order);

    const runs: Record<string, Run> = {};
    for (const round of [1, 2])
      for (const v of ["f1", "f4"]) runs[`${round}-${v}`] = JSON.parse(readFileSync(join(out, `r${round}-${v}`, "runner-bench.json"), "utf8"));
    for (const [k, run] of Object.entries(runs)) expect(run.environment.FREEKV_RESIDENT_FACTOR, k).toBe(k.endsWith("f1") ? "1" : "4");

    const s = JSON.parse(readFileSync(join(out, "ab-summary.json"), "utf8")) as Summary;
    expect(s.variants).toEqual(["f1", "f4"]);
    expect(s.missing).toEqual([]);
    expect(s.rows.map((x) => x.mode).sort()).toEqual(["dense", "freekv"]);
    const step = (round: number, v: string, mode: string) => runs[`${round}-${v}`].results.find((x) => x.mode === mode)!.stepMs;
    for (const row of s.rows) {
      const mean: Record<string, number> = {};
      for (const v of ["f1", "f4"]) {
        const ms = [1, 2].map((round) => step(round, v, row.mode));
        expect(ms.every((x) => Number.isFinite(x) && x > 0)).toBe(true);
        expect(row.variants[v].steps.map((e) => e.round)).toEqual([1, 2]);
        expect(row.variants[v].steps.map((e) => e.ms)).toEqual(ms);
        mean[v] = (ms[0] + ms[1]) / 2;
        expect(row.variants[v].mean).toBeCloseTo(mean[v], 9);
      }
      expect(row.variants.f4.vsFirst).toBeCloseTo(mean.f4 / mean.f1, 9);
    }
    expect(s.refRows.map((e) => `${e.variant} ${e.mode}`).sort()).toEqual(["f1 freekv", "f4 freekv"]);
    for (const e of s.refRows) {
      const ratios = [1, 2].map((round) => step(round, e.variant, "freekv") / step(round, e.variant, "dense"));
      expect(e.ratios.map((x) => x.ratio)).toEqual(ratios);
      expect(e.mean).toBeCloseTo((ratios[0] + ratios[1]) / 2, 9);
    }

    // A run that left no JSON (cut off) is named and fails the summary instead of leaving the means.
    const cut = join(out, "r3-f1");
    mkdirSync(cut, { recursive: true });
    const dirs = ["r1-f1", "r1-f4", "r2-f4", "r2-f1"].map((d) => join(out, d));
    const again = spawnSync(process.execPath, ["scripts/gpu/ab-summary.mjs", ...dirs, cut], { cwd: root, encoding: "utf8" });
    expect(again.status).toBe(1);
    expect(again.stdout).toContain(`no runner-bench.json in ${cut}`);
    const bad = spawnSync(process.execPath, ["scripts/gpu/ab-summary.mjs", join(out, "not-a-run")], { cwd: root, encoding: "utf8" });
    expect(bad.status).toBe(2);
    expect(bad.stderr).toContain("is not named r<round>-<variant>");
  });
});
