#!/usr/bin/env node
// The A/B of scripts/gpu/ab.sh: runner-bench.json files of several rounds and variants, one process
// each, summarised per (batch, context, mode): every round's step, the mean over rounds, and each
// variant's mean against the first variant's. With a reference mode (--ref, e.g.
// resident_sparse@0.95) also every other mode's step over the reference's in the same process, per
// round and as the mean of those ratios. Between processes the same build's step moves by a few
// percent (native/src/engine/cuda/PERF.md, "The runs" of 2026-12-06), so a difference is read
// against the spread of the rounds printed beside it.
//   node scripts/gpu/ab-summary.mjs [--ref MODE] [--json OUT.json] DIR...
// Each DIR is named r<round>-<variant> (ab.sh's layout) and holds runner-bench.json.
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { basename, join } from "node:path";
import { pathToFileURL } from "node:url";

/** Parses "r<round>-<variant>" (the variant may contain dashes); null when the name is not one. */
export function parseRunName(name) {
  const m = /^r(\d+)-(.+)$/.exec(name);
  return m ? { round: Number(m[1]), variant: m[2] } : null;
}

/**
 * runs: [{ round, variant, results: runner-bench.json's results }] in the order they ran.
 * Returns { variants, rows, refRows }: rows per (batch, context, mode) with per-variant steps by
 * round, their mean and min..max, and the mean's ratio to the first variant's; refRows (ref set)
 * per (variant, batch, context, mode != ref) with the per-round ratio to ref and its mean.
 */
export function summarize(runs, ref) {
  const variants = [];
  for (const r of runs) if (!variants.includes(r.variant)) variants.push(r.variant);
  const key = (x) => `${x.batch}|${x.context}|${x.mode}`;
  const rows = new Map();
  for (const r of runs)
    for (const x of r.results) {
      if (!Number.isFinite(x.stepMs)) continue;
      const k = key(x);
      if (!rows.has(k)) rows.set(k, { batch: x.batch, context: x.context, mode: x.mode, by: {} });
      const row = rows.get(k);
      (row.by[r.variant] ??= []).push({ round: r.round, ms: x.stepMs });
    }
  const stats = (list) => {
    const ms = list.map((e) => e.ms);
    return { steps: list, mean: ms.reduce((a, b) => a + b, 0) / ms.length, min: Math.min(...ms), max: Math.max(...ms) };
  };
  const out = [];
  for (const row of rows.values()) {
    const per = {};
    for (const v of variants) if (row.by[v]) per[v] = stats(row.by[v]);
    const base = per[variants[0]];
    for (const v of variants) if (per[v] && base) per[v].vsFirst = per[v].mean / base.mean;
    out.push({ batch: row.batch, context: row.context, mode: row.mode, variants: per });
  }
  const refRows = [];
  if (ref) {
    const acc = new Map();
    for (const r of runs) {
      for (const x of r.results) {
        if (x.mode === ref || !Number.isFinite(x.stepMs)) continue;
        const y = r.results.find((z) => z.mode === ref && z.batch === x.batch && z.context === x.context);
        if (!y || !Number.isFinite(y.stepMs)) continue;
        const k = `${r.variant}|${key(x)}`;
        if (!acc.has(k)) acc.set(k, { variant: r.variant, batch: x.batch, context: x.context, mode: x.mode, ratios: [] });
        acc.get(k).ratios.push({ round: r.round, ratio: x.stepMs / y.stepMs });
      }
    }
    for (const e of acc.values())
      refRows.push({ ...e, mean: e.ratios.reduce((a, b) => a + b.ratio, 0) / e.ratios.length });
  }
  return { variants, rows: out, refRows };
}

/** The summary as markdown tables. */
export function formatSummary(s, ref) {
  const lines = [];
  const head = ["batch, context, mode", ...s.variants.map((v) => `${v}: ms by round; mean (min-max)`)];
  if (s.variants.length > 1) head.push(...s.variants.slice(1).map((v) => `${v} / ${s.variants[0]}`));
  lines.push(`| ${head.join(" | ")} |`, `| ${head.map(() => "---").join(" | ")} |`);
  for (const r of s.rows) {
    const cells = [`${r.batch}, ${r.context}, ${r.mode}`];
    for (const v of s.variants) {
      const p = r.variants[v];
      cells.push(
        p ? `${p.steps.map((e) => e.ms.toFixed(2)).join(", ")}; ${p.mean.toFixed(2)} (${p.min.toFixed(2)}-${p.max.toFixed(2)})` : "",
      );
    }
    for (const v of s.variants.slice(1)) cells.push(r.variants[v]?.vsFirst ? r.variants[v].vsFirst.toFixed(3) : "");
    lines.push(`| ${cells.join(" | ")} |`);
  }
  if (ref && s.refRows.length) {
    lines.push("", `| variant | batch, context, mode | / ${ref} by round | mean |`, "| --- | --- | --- | --- |");
    for (const e of s.refRows)
      lines.push(
        `| ${e.variant} | ${e.batch}, ${e.context}, ${e.mode} | ${e.ratios.map((x) => x.ratio.toFixed(3)).join(", ")} | ${e.mean.toFixed(3)} |`,
      );
  }
  return lines.join("\n");
}

function main(argv) {
  let ref;
  let jsonOut;
  const dirs = [];
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--ref") ref = argv[++i];
    else if (argv[i] === "--json") jsonOut = argv[++i];
    else dirs.push(argv[i]);
  }
  if (dirs.length === 0) {
    console.error("usage: node scripts/gpu/ab-summary.mjs [--ref MODE] [--json OUT.json] r<round>-<variant>...");
    return 2;
  }
  const runs = [];
  const missing = [];
  for (const d of dirs) {
    const name = parseRunName(basename(d));
    if (!name) {
      console.error(`ab-summary: ${d} is not named r<round>-<variant>`);
      return 2;
    }
    const f = join(d, "runner-bench.json");
    if (!existsSync(f)) {
      missing.push(d);
      continue;
    }
    runs.push({ ...name, results: JSON.parse(readFileSync(f, "utf8")).results ?? [] });
  }
  runs.sort((a, b) => a.round - b.round);
  const s = summarize(runs, ref);
  console.log(formatSummary(s, ref));
  // A run that wrote no JSON (cut off, failed) is named, not silently left out of the means.
  for (const d of missing) console.log(`(no runner-bench.json in ${d}: that run did not finish)`);
  if (jsonOut) writeFileSync(jsonOut, JSON.stringify({ ref: ref ?? null, missing, ...s }, null, 2));
  return missing.length ? 1 : 0;
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) process.exitCode = main(process.argv.slice(2));
