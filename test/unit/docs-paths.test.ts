/**
 * The repository paths the documentation names exist: every `code span` of a tracked Markdown file
 * (results folders aside: they record what was there when they ran) that starts with one of the
 * repository's top-level folders must be a file or folder, or the stem of one (`gemm_cublaslt` for
 * its .cu and .cuh). A README that points an operator at a removed script or a results folder
 * that was renamed is a manual that lies.
 */
import { execFileSync } from "node:child_process";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { basename, dirname, join } from "node:path";
import { describe, expect, it } from "vitest";

const ROOT = join(import.meta.dirname, "..", "..");
const TOP = ["bench", "native", "scripts", "services", "tools", "test", "deploy", "proto", "models", "packages"];

/** The repository paths named in a Markdown text: code spans that start with a top-level folder, without a `:line` or `#anchor` tail; spans holding a pattern (`*`) or a `<name>` to fill in are left out. */
export function namedPaths(markdown: string): string[] {
  const out = new Set<string>();
  for (const m of markdown.matchAll(/`([^`\s]+)`/g)) {
    const span = m[1];
    if (!TOP.some((t) => span.startsWith(`${t}/`)) || /[*<>{}$]/.test(span)) continue;
    out.add(span.replace(/[:#].*$/, ""));
  }
  return [...out];
}

/** Whether `path` (relative to `root`) is there, as itself or as the stem of a file beside it. */
export function pathExists(root: string, path: string): boolean {
  const full = join(root, path);
  if (existsSync(full)) return true;
  const dir = dirname(full);
  return existsSync(dir) && readdirSync(dir).some((f) => f.startsWith(`${basename(full)}.`));
}

function trackedMarkdown(): string[] {
  const files = execFileSync("git", ["ls-files", "*.md"], { cwd: ROOT, encoding: "utf8" }).split("\n").filter(Boolean);
  return files.filter((f) => !f.startsWith("bench/results/") && !f.includes("node_modules/"));
}

describe("paths named in the documentation", () => {
  it("finds a path, leaves patterns and tails out, and reports one that is not there", () => {
    const text = "see `scripts/gpu/points.sh`, `native/src/model/cuda/gemm_cublaslt`, `bench/results/*.json`, " +
      "`services/compute/config.ts:35`, `FREEKV_TAU`, and `bench/results/no-such-run-19700101/`";
    const named = namedPaths(text);
    expect(named).toEqual(["scripts/gpu/points.sh", "native/src/model/cuda/gemm_cublaslt", "services/compute/config.ts",
      "bench/results/no-such-run-19700101/"]);
    expect(named.filter((p) => !pathExists(ROOT, p))).toEqual(["bench/results/no-such-run-19700101/"]);
  });

  it("every tracked Markdown file names only paths that exist", () => {
    const files = trackedMarkdown();
    expect(files).toContain("README.md");
    const missing: string[] = [];
    let named = 0;
    for (const f of files) {
      for (const p of namedPaths(readFileSync(join(ROOT, f), "utf8"))) {
        named += 1;
        if (!pathExists(ROOT, p)) missing.push(`${f}: ${p}`);
      }
    }
    expect(named).toBeGreaterThan(100); // the README alone names well over a hundred
    expect(missing).toEqual([]);
  });
});
