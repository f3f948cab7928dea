/**
 * What the benchmark programs share: the provenance every results file carries (commit, machine,
 * FREEKV_ settings, date-stamped path under bench/results/), the seeded random prompts sent to
 * Generate, and one percentile definition.
 */
import { execSync } from "node:child_process";
import os from "node:os";
import { join } from "node:path";
import { mulberry32 } from "../tools/reference/prng.js";

/** The short commit of the checkout at `cwd`, or "unknown" outside a git checkout. */
export function gitCommit(cwd: string): string {
  try {
    return execSync("git rev-parse --short HEAD", { cwd, stdio: ["ignore", "pipe", "ignore"] }).toString().trim();
  } catch {
    return "unknown";
  }
}

/** The machine a figure was measured on. */
export function machineInfo(): { host: string; cpus: number; cpuModel: string | undefined; memGiB: number; node: string } {
  return { host: os.hostname(), cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model, memGiB: os.totalmem() / 2 ** 30, node: process.version };
}

/** The FREEKV_ settings of this process's environment. */
export function freekvEnv(): Record<string, string | undefined> {
  return Object.fromEntries(Object.entries(process.env).filter(([k]) => k.startsWith("FREEKV_")));
}

/** bench/results/<name>-YYYYMMDD-HHMM.json under `root`, stamped with the time (UTC) of the call. */
export function resultsPath(root: string, name: string, at = new Date()): string {
  const stamp = at.toISOString().slice(0, 16).replace(/[-:]/g, "").replace("T", "-");
  return join(root, "bench", "results", `${name}-${stamp}.json`);
}

/**
 * `n` seeded random token ids for a prompt, away from the special tokens at both ends of a
 * vocabulary of `vocab` ids (the first 16, the last 10%).
 */
export function randomPromptIds(n: number, seed: number, vocab: number): number[] {
  const r = mulberry32(seed);
  const lo = Math.min(16, vocab - 1), span = Math.max(1, Math.floor(vocab * 0.9) - lo);
  return Array.from({ length: n }, () => lo + Math.floor(r() * span));
}

/** The nearest-rank p-quantile (0 < p <= 1) of the finite values of `xs`; null when there are none. */
export function percentile(xs: readonly (number | null | undefined)[], p: number): number | null {
  const s = xs.filter((x): x is number => typeof x === "number" && Number.isFinite(x)).sort((a, b) => a - b);
  if (s.length === 0) return null;
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(p * s.length) - 1))];
}
