#!/usr/bin/env node
// Per-kernel device time of a step from Nsight Compute's CSV (visit.sh PROFILE=1 writes
// profile/ncu.csv: one row per kernel, metric gpu__time_duration.sum). Prints a markdown table,
// kernels grouped by name and stream, largest total first.
//   node scripts/gpu/ncu-summary.mjs path/to/ncu.csv [steps=1]
import { readFileSync } from "node:fs";

const [file, stepsArg] = process.argv.slice(2);
if (!file) {
  console.error("usage: node scripts/gpu/ncu-summary.mjs ncu.csv [steps]");
  process.exit(2);
}
const steps = Number(stepsArg ?? 1);
const parseRow = (line) => {
  const out = [];
  let cur = "", quoted = false;
  for (let i = 0; i < line.length; i++) {
    const ch = line[i];
    if (quoted) {
      if (ch === '"' && line[i + 1] === '"') (cur += '"'), i++;
      else if (ch === '"') quoted = false;
      else cur += ch;
    } else if (ch === '"') quoted = true;
    else if (ch === ",") out.push(cur), (cur = "");
    else cur += ch;
  }
  out.push(cur);
  return out;
};
const lines = readFileSync(file, "utf8").split("\n").filter((l) => l.startsWith('"'));
const head = parseRow(lines[0]);
const col = (n) => {
  const i = head.indexOf(n);
  if (i < 0) throw new Error(`column ${n} missing from ${file}`);
  return i;
};
const [kName, kStream, kUnit, kValue] = ["Kernel Name", "Stream", "Metric Unit", "Metric Value"].map(col);
const scale = { nsecond: 1e-3, ns: 1e-3, usecond: 1, us: 1, msecond: 1e3, ms: 1e3 };
const groups = new Map();
let total = 0, kernels = 0;
for (const line of lines.slice(1)) {
  const r = parseRow(line);
  const f = scale[r[kUnit]];
  if (f === undefined) throw new Error(`unknown unit ${r[kUnit]}`);
  const us = Number(r[kValue].replace(/,/g, "")) * f;
  const name = r[kName].replace(/\(.*$/, "").replace(/^void /, "");
  const key = `${name}\u0000${r[kStream]}`;
  const g = groups.get(key) ?? { name, stream: r[kStream], n: 0, us: 0 };
  g.n++, (g.us += us);
  groups.set(key, g);
  total += us;
  kernels++;
}
console.log(`${kernels} kernels, ${(total / 1e3).toFixed(2)} ms of kernel time over ${steps} step(s) (each kernel alone: no overlap, no launch gaps)`);
console.log("");
console.log("| kernel | stream | launches per step | us per launch | ms per step | share |");
console.log("| --- | --- | --- | --- | --- | --- |");
for (const g of [...groups.values()].sort((a, b) => b.us - a.us))
  console.log(`| ${g.name} | ${g.stream} | ${g.n / steps} | ${(g.us / g.n).toFixed(1)} | ${(g.us / steps / 1e3).toFixed(3)} | ${((100 * g.us) / total).toFixed(1)}% |`);
