#!/usr/bin/env node
/**
 * Writes synthetic long-context tasks as JSONL (see tools/tasks/README.md):
 *
 *   node dist/tools/tasks/main.js --corpus FILE --seed S --count N \
 *     (--context-tokens T[:T2] [--chars-per-token C] | --context-chars N[:N2]) \
 *     [--families single_needle,multi_key:2,...] [--depths 0,0.5,1] [--start I] [--out FILE|-]
 *
 * A range T:T2 draws each task's length uniformly in it. Families are taken in turn by task index
 * (a weight repeats a family in the cycle). With --depths, task i uses depth
 * depths[floor(i / cycle length) % depths.length] (a grid over families x depths); without it the
 * depth is drawn uniformly. Task i depends only on (seed, i, options): --start lets several
 * processes write disjoint parts of one set.
 */
import { closeSync, openSync, writeSync } from "node:fs";
import { once } from "node:events";
import { pathToFileURL } from "node:url";
import { Filler } from "./filler.js";
import { FAMILIES, generateTask, type Family } from "./generate.js";
import { Rng } from "./rng.js";

interface Args {
  corpus: string;
  seed: number;
  count: number;
  start: number;
  tokens?: [number, number];
  chars?: [number, number];
  charsPerToken: number;
  families: Family[];
  depths?: number[];
  out: string;
}

function usage(msg: string): never {
  process.stderr.write(`tasks: ${msg}\nusage: main.js --corpus FILE --seed S --count N (--context-tokens T[:T2] [--chars-per-token C] | --context-chars N[:N2]) [--families a,b:2] [--depths 0,0.5,1] [--start I] [--out FILE|-]\n`);
  process.exit(2);
}

function range(v: string, name: string): [number, number] {
  const [a, b] = v.split(":").map(Number);
  const hi = b ?? a;
  if (!(a > 0) || !(hi >= a)) usage(`${name} must be N or A:B with 0 < A <= B`);
  return [a, hi];
}

export function parseArgs(argv: string[]): Args {
  const m = new Map<string, string>();
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith("--") || argv[i + 1] === undefined) usage(`bad argument ${argv[i]}`);
    m.set(argv[i].slice(2), argv[i + 1]);
  }
  const known = ["corpus", "seed", "count", "start", "context-tokens", "context-chars", "chars-per-token", "families", "depths", "out"];
  for (const k of m.keys()) if (!known.includes(k)) usage(`unknown option --${k}`);
  const corpus = m.get("corpus") ?? usage("--corpus is required");
  const families: Family[] = [];
  for (const f of (m.get("families") ?? FAMILIES.join(",")).split(",")) {
    const [name, w] = f.split(":");
    if (!(FAMILIES as readonly string[]).includes(name)) usage(`unknown family ${name} (${FAMILIES.join(", ")})`);
    const weight = w === undefined ? 1 : Number(w);
    if (!Number.isInteger(weight) || weight < 1) usage(`weight of ${name} must be a positive integer`);
    for (let i = 0; i < weight; i++) families.push(name as Family);
  }
  const a: Args = {
    corpus,
    seed: Number(m.get("seed") ?? 0),
    count: Number(m.get("count") ?? 1),
    start: Number(m.get("start") ?? 0),
    charsPerToken: Number(m.get("chars-per-token") ?? 3.6),
    families,
    out: m.get("out") ?? "-",
  };
  if (m.has("context-tokens")) a.tokens = range(m.get("context-tokens")!, "--context-tokens");
  if (m.has("context-chars")) a.chars = range(m.get("context-chars")!, "--context-chars");
  if (!a.tokens === !a.chars) usage("give exactly one of --context-tokens and --context-chars");
  if (m.has("depths")) {
    a.depths = m.get("depths")!.split(",").map(Number);
    if (a.depths.some((d) => !(d >= 0 && d <= 1))) usage("--depths must be numbers in [0, 1]");
  }
  for (const k of ["seed", "count", "start"] as const) if (!Number.isInteger(a[k]) || a[k] < 0) usage(`--${k} must be a non-negative integer`);
  if (!(a.charsPerToken > 0)) usage("--chars-per-token must be positive");
  return a;
}

export function* tasks(filler: Filler, a: Args) {
  for (let i = a.start; i < a.start + a.count; i++) {
    const family = a.families[i % a.families.length];
    const depth = a.depths ? a.depths[Math.floor(i / a.families.length) % a.depths.length] : undefined;
    const lenRng = new Rng(a.seed, i, 0x1e6);
    const pick = ([lo, hi]: [number, number]) => Math.round(lo + (hi - lo) * lenRng.float());
    let contextTokens: number;
    let contextChars: number;
    if (a.tokens) {
      contextTokens = pick(a.tokens);
      contextChars = Math.round(contextTokens * a.charsPerToken);
    } else {
      contextChars = pick(a.chars!);
      contextTokens = Math.round(contextChars / a.charsPerToken);
    }
    yield generateTask(filler, { seed: a.seed, family, depth, contextChars, contextTokens }, i);
  }
}

async function main() {
  const a = parseArgs(process.argv.slice(2));
  const filler = Filler.fromFile(a.corpus);
  const fd = a.out === "-" ? -1 : openSync(a.out, "w");
  // A reader that stops early (closes the pipe) ends the run quietly.
  process.stdout.on("error", (e: NodeJS.ErrnoException) => {
    if (e.code === "EPIPE") process.exit(0);
    throw e;
  });
  const write = async (s: string) => {
    if (fd >= 0) writeSync(fd, s);
    else if (!process.stdout.write(s)) await once(process.stdout, "drain"); // backpressure: never queue more than one chunk
  };
  let buf = "";
  for (const t of tasks(filler, a)) {
    buf += JSON.stringify(t) + "\n";
    if (buf.length > 1 << 20) {
      await write(buf);
      buf = "";
    }
  }
  if (buf) await write(buf);
  if (fd >= 0) closeSync(fd);
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) await main();
