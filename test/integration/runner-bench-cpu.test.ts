/**
 * The GPU runner benchmark (scripts/gpu/runner-bench.ts) run on the CPU backend with its small
 * shape, bundled as the GPU visit bundles it: the script a device visit depends on is checked
 * here first. It writes its random model, runs a calibration sweep, chooses the band nearest the
 * target cosine, runs the calibrated mode on it, and reports per-layer query dynamics; the bands'
 * cosines must follow their embedding correlation, and no two rows of a weight matrix may be equal
 * (a template whose length divided the rows made the 8B shape's projections rank 16).
 */
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { spawnSync } from "node:child_process";
import { afterAll, describe, expect, it } from "vitest";
import { build } from "esbuild";

const root = join(import.meta.dirname, "..", "..");
const dir = mkdtempSync(join(tmpdir(), "freekv-runner-cpu-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

interface Dyn {
  cosMean: number;
  overlapPct: number;
  layers: { cosMean: number }[];
}
interface Result {
  mode: string;
  stepMs?: number;
  error?: string;
  dynamics?: Dyn;
}

describe("runner-bench on the CPU backend", () => {
  it("sweeps the calibration bands, picks the nearest to the target cosine and runs on it", { timeout: 240_000 }, async () => {
    const bundle = join(dir, "runner-bench.mjs");
    await build({
      entryPoints: [join(root, "scripts/gpu/runner-bench.ts")],
      bundle: true,
      platform: "node",
      format: "esm",
      target: "node20",
      banner: { js: "import { createRequire as __cr } from 'node:module'; const require = __cr(import.meta.url);" },
      outfile: bundle,
      logLevel: "warning",
    });
    const out = join(dir, "out");
    const r = spawnSync(
      process.execPath,
      [bundle, "--backend", "cpu", "--shape", "small", "--dir", join(dir, "model"), "--points", "1:1024", "--modes", "freekv", "--sweep", "freekv@0.3,freekv@0.9,freekv@0.99", "--match-cosine", "0.8", "--calibrated", "dense", "--steps", "4", "--out", out],
      { encoding: "utf8", timeout: 200_000, env: { ...process.env, FREEKV_ADDON: join(root, "native/build/Release/freekv.node") } },
    );
    expect(r.status, `${r.stdout}\n${r.stderr}`).toBe(0);
    // No two rows of a projection are equal (a template whose length divides the rows' repeated them).
    const file = readFileSync(join(dir, "model", "model-layer-000.safetensors"));
    const n = Number(file.readBigUInt64LE(0));
    const header = JSON.parse(file.subarray(8, 8 + n).toString("utf8")) as Record<string, { shape: number[]; data_offsets: [number, number] }>;
    const q = header["model.layers.0.self_attn.q_proj.weight"];
    const [rows, cols] = q.shape;
    const rowsSeen = new Set<string>();
    for (let i = 0; i < rows; i++) rowsSeen.add(file.subarray(8 + n + q.data_offsets[0] + i * cols * 2, 8 + n + q.data_offsets[0] + (i + 1) * cols * 2).toString("base64"));
    expect(rowsSeen.size).toBe(rows);
    const json = JSON.parse(readFileSync(join(out, "runner-bench.json"), "utf8")) as { backend: string; calibration: { band: string; cosMean: number } | null; results: Result[] };
    expect(json.backend).toBe("cpu");
    const by = new Map(json.results.map((p) => [p.mode, p]));
    for (const p of json.results) {
      expect(p.error, p.mode).toBeUndefined();
      expect(p.stepMs, p.mode).toBeGreaterThan(0);
      expect(p.dynamics!.layers.length, p.mode).toBe(4);
    }
    const cos = (m: string) => by.get(m)!.dynamics!.cosMean;
    // The bands' queries move less as their embeddings correlate more, at every layer.
    expect(cos("freekv@0.3")).toBeLessThan(cos("freekv@0.9"));
    expect(cos("freekv@0.9")).toBeLessThan(cos("freekv@0.99"));
    for (let l = 0; l < 4; l++) expect(by.get("freekv@0.3")!.dynamics!.layers[l].cosMean).toBeLessThan(by.get("freekv@0.99")!.dynamics!.layers[l].cosMean);
    // The argmax steps of a random model are unrelated queries.
    expect(Math.abs(cos("freekv"))).toBeLessThan(cos("freekv@0.9"));
    // The chosen band is the swept one nearest the target, and the calibrated mode ran on it.
    const nearest = ["freekv@0.3", "freekv@0.9", "freekv@0.99"].reduce((a, b) => (Math.abs(cos(b) - 0.8) < Math.abs(cos(a) - 0.8) ? b : a));
    expect(json.calibration?.band).toBe(nearest.split("@")[1]);
    expect(by.has(`dense@${json.calibration!.band}`)).toBe(true);
  });

  // The pages a query leaves come back, in the trained model, at a rate the device pool turns into
  // hits; the independent keys of the fill make them come back far more often (README, "How far
  // the pooled figures carry"). With --keys topics:1.5 the pool-4 recall over the pool-1 recall must be
  // the trained model's own (its `freekv eval` at 8K, factors 1 and 4, the engine's counters), and
  // with iid keys well below it.
  it("with keys around topics a pooled session recalls, against an unpooled one, what the trained model does", { timeout: 240_000 }, () => {
    const bundle = join(dir, "runner-bench.mjs");
    expect(existsSync(bundle), "the first test bundles the runner").toBe(true);
    const evalRecall = (f: number) => {
      const r = spawnSync("xz", ["-dc", join(root, `bench/results/resident-pool-20261206/eval-factor${f}.json.xz`)], { encoding: "utf8", maxBuffer: 1 << 28 });
      expect(r.status, r.stderr).toBe(0);
      return (JSON.parse(r.stdout) as { modes: { retrieval: { pages_recalled_per_step: number } }[] }).modes[0].retrieval.pages_recalled_per_step;
    };
    const modelRatio = evalRecall(4) / evalRecall(1);
    expect(modelRatio).toBeGreaterThan(0);
    const ratio: Record<string, number> = {};
    // topics:1.5 (strong topics) at this small shape; the default amplitude is the 8B shape's.
    for (const keys of ["iid", "topics:1.5"]) {
      const out = join(dir, `keys-${keys}`);
      const r = spawnSync(
        process.execPath,
        [bundle, "--backend", "cpu", "--shape", "small", "--dir", join(dir, "model"), "--keys", keys, "--points", "1:8192", "--modes", "freekv-pool1@0.95,freekv-pool4@0.95", "--warmup", "32", "--steps", "16", "--out", out],
        { encoding: "utf8", timeout: 200_000, env: { ...process.env, FREEKV_ADDON: join(root, "native/build/Release/freekv.node") } },
      );
      expect(r.status, `${r.stdout}\n${r.stderr}`).toBe(0);
      const json = JSON.parse(readFileSync(join(out, "runner-bench.json"), "utf8")) as { keys: string; results: (Result & { recallMBPerStep: number })[] };
      expect(json.keys).toBe(keys);
      const mb = (m: string) => json.results.find((p) => p.mode === m)!.recallMBPerStep;
      expect(mb("freekv-pool1@0.95")).toBeGreaterThan(0);
      ratio[keys] = mb("freekv-pool4@0.95") / mb("freekv-pool1@0.95");
    }
    expect(Math.abs(ratio["topics:1.5"] - modelRatio), `topics ${ratio["topics:1.5"]}, model ${modelRatio}`).toBeLessThan(0.35 * modelRatio);
    expect(ratio.iid, `iid ${ratio.iid}, model ${modelRatio}`).toBeLessThan(0.5 * modelRatio);
  });
});
