/**
 * Runs the CUDA correctness cases (test/gpu/cases.ts) and prints a table; bundled by
 * scripts/gpu/pack.sh into .gpu/run-checks.mjs for the GPU machine, which has Node.js (carried)
 * but no node_modules. Writes the log and a JSON summary under $OUT (or .gpu/out).
 * Exit code: 0 when every case passes, 1 otherwise, 2 when CUDA is unavailable.
 *   node .gpu/run-checks.mjs [--candidate cuda|cpu] [--only 8,9] [--no-timing]
 * --candidate cpu checks the harness with the CPU engine as the candidate; --only runs the cases
 * of those indices; --no-timing leaves out the per-call timing after the cases.
 */
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { loadAddon } from "../../native/binding.js";
import { CASES, cudaStatus, runCase, type CaseResult } from "../../test/gpu/cases.js";
import { runTiming, type TimingRow } from "./timing.js";
import { outDir, outLog } from "./out-log.js";

const log = outLog("gpu-checks.log");

const { values: args } = parseArgs({
  options: { candidate: { type: "string", default: "cuda" }, only: { type: "string" }, "no-timing": { type: "boolean", default: false } },
});
if (args.candidate !== "cuda" && args.candidate !== "cpu") throw new RangeError(`--candidate must be cuda or cpu (got '${args.candidate}')`);
const candidate = args.candidate;
const info = loadAddon().backendInfo();
log(`backendInfo: ${JSON.stringify(info)}`);
const status = cudaStatus();
if (candidate === "cuda" && !status.available) {
  log(`CUDA unavailable: ${status.reason}`);
  process.exit(2);
}
const only = args.only ? args.only.split(",").map(Number) : null;
const results: CaseResult[] = [];
for (const [i, spec] of CASES.entries()) {
  if (only && !only.includes(i)) continue;
  results.push(await runCase(spec, log, candidate));
}
const fmt = (x: number) => x.toExponential(1);
log("");
log("| case | result | decode vs CPU | decode vs f64 | prefill vs CPU | prefill vs f64 | attended diffs | near-ties | corrections | recalled | ms |");
log("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
for (const r of results)
  log(`| ${r.name} | ${r.ok ? "pass" : "FAIL"} | ${fmt(r.decodeVsCpu)} | ${fmt(r.decodeVsRef)} | ${fmt(r.prefillVsCpu)} | ${fmt(r.prefillVsRef)} | ${r.attendedMismatches} | ${r.nearTies} | ${r.corrections} | ${r.recalled} | ${r.ms} |`);
const ok = results.every((r) => r.ok);
let timing: TimingRow[] = [];
if (candidate === "cuda" && !args["no-timing"]) {
  try {
    timing = await runTiming(log);
    log("");
    log("| engine.decode() per layer call (wall, JS included) | context | batch | median ms | p90 ms | corrections | recalled head-pages per call |");
    log("| --- | --- | --- | --- | --- | --- | --- |");
    for (const t of timing)
      log(`| ${t.mode} | ${t.context} | ${t.batch} | ${t.msPerCall.toFixed(3)} | ${t.p90.toFixed(3)} | ${t.corrections} | ${t.recalledPerCall.toFixed(1)} |`);
  } catch (e) {
    log(`timing failed: ${(e as Error).stack ?? e}`);
  }
}
log(`${results.filter((r) => r.ok).length}/${results.length} cases pass (candidate: ${candidate}${status.available ? ", " + status.reason : ""})`);
writeFileSync(join(outDir, "gpu-checks.json"), JSON.stringify({ date: new Date().toISOString(), candidate, backendInfo: info, results, timing }, null, 2));
process.exit(ok ? 0 : 1);
