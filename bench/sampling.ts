/**
 * One draw at temperature > 0 over a Llama 3 vocabulary (128,256 logits), on the path Generate
 * takes (services/compute/generate/sampling.ts): the TypeScript reference sampleJs, the addon's
 * sampleF32 (what Sampler.sample uses for a real vocabulary), and the addon's sampleRowsAsync for a
 * batch of rows (what the decode scheduler uses), per row. Flat logits (a random model's: every
 * token is a candidate) and peaked ones (a trained model's). The floor is reading the row once
 * (512 KB) at this machine's memory bandwidth, stated beside the figures as the time of a plain
 * sum over the row.
 *
 *   npm run build:ts && npm run bench:sampling [-- --draws 40 --batch 8 --out FILE.json]
 *
 * Writes JSON (machine, commit, date, results) to --out, or bench/results/sampling-<date>.json.
 */
import { mkdirSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { addonFn, sampleJs } from "../services/compute/generate/sampling.js";
import { gaussianF32, mulberry32 } from "../tools/reference/prng.js";
import { gitCommit, machineInfo, percentile, resultsPath } from "./common.js";

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, "..", here.includes(`${join("dist", "bench")}`) ? ".." : "");
const { values: args } = parseArgs({ options: { draws: { type: "string", default: "40" }, batch: { type: "string", default: "8" }, out: { type: "string" } } });
const draws = Number(args.draws);
const batch = Number(args.batch);
if (!(Number.isInteger(draws) && draws >= 1) || !(Number.isInteger(batch) && batch >= 1 && batch <= 256)) throw new RangeError("--draws must be >= 1 and --batch in [1, 256]");
const V = 128256;
const one = addonFn("sampleF32");
const rows = addonFn("sampleRowsAsync");
if (!one || !rows) throw new Error("the addon's sampling functions are missing (npm run build:native)");
const rand = mulberry32(20261203);
const median = (v: number[]) => percentile(v, 0.5) ?? NaN;

async function timeMs(n: number, f: (i: number) => unknown | Promise<unknown>): Promise<number> {
  for (let i = 0; i < 3; i++) await f(i);
  const t: number[] = [];
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    await f(i);
    t.push(performance.now() - t0);
  }
  return median(t);
}

const results: Record<string, unknown>[] = [];
const table = ["| logits | top-p | floor: one read of the row, ms | TypeScript, ms | sampleF32, ms | sampleRowsAsync, ms per row (batch " + batch + ") |", "| --- | ---: | ---: | ---: | ---: | ---: |"];
for (const [kind, scale] of [["flat (random model)", 0.5], ["peaked (trained model)", 6]] as const) {
  const logits = gaussianF32(V * batch, rand, scale);
  let sink = 0;
  const floor = await timeMs(draws, () => {
    let s = 0;
    for (let i = 0; i < V; i++) s += logits[i];
    sink += s;
  });
  for (const topP of [0, 0.9]) {
    const u = Array.from({ length: draws + 3 }, () => rand());
    const js = await timeMs(draws, (i) => sampleJs(logits, 0, V, { temperature: 1, topK: 0, topP, seed: 0 }, u[i]));
    const nat = await timeMs(draws, (i) => one(logits, 0, V, 1, 0, topP, u[i]));
    const params = new Float64Array(4 * batch);
    for (let r = 0; r < batch; r++) params.set([1, 0, topP, rand()], 4 * r);
    const idx = Int32Array.from({ length: batch }, (_, r) => r);
    const perRow = (await timeMs(Math.max(3, Math.ceil(draws / batch)), () => rows(logits, V, idx, params))) / batch;
    results.push({ logits: kind, topP, floorMs: floor, typescriptMs: js, sampleF32Ms: nat, sampleRowsAsyncMsPerRow: perRow, batch });
    table.push(`| ${kind} | ${topP || "-"} | ${floor.toFixed(3)} | ${js.toFixed(2)} | ${nat.toFixed(2)} | ${perRow.toFixed(2)} |`);
  }
  if (sink === 42) process.stderr.write("");
}
console.log(table.join("\n"));
const out = args.out ?? resultsPath(root, "sampling");
mkdirSync(dirname(out), { recursive: true });
writeFileSync(out, JSON.stringify({ what: "one draw at temperature 1 over 128,256 logits: TypeScript, addon, addon batched", date: new Date().toISOString(), commit: gitCommit(root), machine: machineInfo(), vocab: V, draws, batch, results, table }, null, 2));
process.stderr.write(`wrote ${out}\n`);
