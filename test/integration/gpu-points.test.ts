/**
 * scripts/gpu/points.sh, the recall rows and runner points of one GPU visit: here on the CPU
 * backend with runner-bench's small shape. Each argument must become one runner process with the
 * topics feed unless it says otherwise, a point whose minimum time is not left must be skipped and
 * said so, every point's step line must reach the summary, and the archive must hold each
 * process's own JSON. (The benchmark's sections need a GPU: here their failure must be reported.)
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { spawnSync } from "node:child_process";
import { afterAll, describe, expect, it } from "vitest";

const root = join(import.meta.dirname, "..", "..");
const dir = mkdtempSync(join(tmpdir(), "freekv-points-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("the GPU points script", () => {
  it("takes the floors' HBM rate from the kernel program's JSON, and says when there is none", () => {
    const dir2 = mkdtempSync(join(tmpdir(), "freekv-hbm-"));
    try {
      const rate = 1000 + Math.floor(Math.random() * 4000) + 0.25;
      const f = join(dir2, "bench.json");
      writeFileSync(f, JSON.stringify({ ceilings: { d2d_copy_GBps_read_plus_write: rate } }));
      const ok = spawnSync("bash", ["bench/gpu/hbm-rate.sh", f], { cwd: root, encoding: "utf8" });
      expect([ok.status, ok.stdout]).toEqual([0, String(rate)]);
      writeFileSync(f, JSON.stringify({ ceilings: {} }));
      expect(spawnSync("bash", ["bench/gpu/hbm-rate.sh", f], { cwd: root, encoding: "utf8" }).status).toBe(1);
      expect(spawnSync("bash", ["bench/gpu/hbm-rate.sh", join(dir2, "missing.json")], { cwd: root, encoding: "utf8" }).status).toBe(1);
    } finally {
      rmSync(dir2, { recursive: true, force: true });
    }
  });

  it("runs one runner a point, skips what its time does not allow and archives each run's JSON", { timeout: 240_000 }, () => {
    const out = join(dir, "out");
    const runner = `--backend cpu --shape small --dir ${join(dir, "model")} --points 1:1024 --modes freekv --warmup 2`;
    const r = spawnSync(
      "bash",
      ["scripts/gpu/points.sh", `first|10|${runner} --steps 3`, `iid|10|${runner} --steps 2 --keys iid`, `late|100000|${runner}`],
      { cwd: root, encoding: "utf8", timeout: 220_000, env: { ...process.env, OUT: out, VISIT_S: "200", FREEKV_ADDON: join(root, "native/build/Release/freekv.node") } },
    );
    expect(r.status, `${r.stdout}\n${r.stderr}`).toBe(0);
    const summary = readFileSync(join(out, "summary.txt"), "utf8");
    expect(summary).toMatch(/^bench rc=\d+ at \d+s$/m);
    expect(summary).toMatch(/^first rc=0 at \d+s$/m);
    expect(summary).toMatch(/^iid rc=0 at \d+s$/m);
    expect(summary).toMatch(/^late skipped \(\d+ s left\)$/m);
    expect(summary.match(/^b1 ctx 1024 freekv: [\d.]+ ms\/step/gm)?.length).toBe(2);
    // No bench here (no GPU): the floors fall back to the runner's default, and the summary says so.
    expect(summary).toMatch(/^floors at 4290 GB\/s \(runner-bench's default; no measured copy rate\)$/m);

    const x = join(dir, "x");
    spawnSync("mkdir", ["-p", x]);
    const t = spawnSync("tar", ["xJf", join(out, "r.tar.xz"), "-C", x], { encoding: "utf8" });
    expect(t.status, t.stderr).toBe(0);
    const run = (name: string) => JSON.parse(readFileSync(join(x, "r", name, "runner-bench.json"), "utf8"));
    const first = run("first"), iid = run("iid");
    expect([first.keys, first.steps, first.warmup]).toEqual(["topics", 3, 2]);
    expect([iid.keys, iid.steps]).toEqual(["iid", 2]);
    expect([first.hbmGBps, iid.hbmGBps]).toEqual([4290, 4290]);
    expect(first.results[0].stepMs).toBeGreaterThan(0);
    expect(() => readFileSync(join(x, "r", "late", "runner-bench.json"))).toThrow();
  });
});
