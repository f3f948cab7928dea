/**
 * `freekv eval` with the trained model (models/retrieval-8m) on the CPU backend, end to end as a
 * process, over 8 single-needle tasks of about 2K tokens (test/fixtures/tasks/needle-2k.jsonl, the
 * family it was trained on). What the harness must show, with margins rather than fixed scores:
 * dense answers most of them; freekv, attending 192 of ~2K tokens (sink 32 + selected 128 + window
 * 32), answers about as many as dense; sink + window with the same budget, which cannot see a
 * needle in the middle of the prompt, answers few. Recalls and corrections happen only in freekv.
 */
import { execFile } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, describe, expect, it } from "vitest";
import type { ModeSummary } from "../../tools/eval/summary.js";

const execFileP = promisify(execFile);
const ROOT = join(import.meta.dirname, "..", "..");
const TSX = join(ROOT, "node_modules", ".bin", "tsx");
const MAIN = join(ROOT, "tools", "cli", "main.ts");
const dir = mkdtempSync(join(tmpdir(), "freekv-eval-trained-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("freekv eval on the trained model (CPU, 2K single needle, budget 32+128+32)", () => {
  it("dense and freekv find the needles, sink + window mostly cannot", { timeout: 240_000 }, async () => {
    const out = join(dir, "run.json");
    await execFileP(
      TSX,
      [MAIN, "eval", "--model", join(ROOT, "models", "retrieval-8m"), "--tasks", join(ROOT, "test", "fixtures", "tasks", "needle-2k.jsonl"),
        "--modes", "dense,freekv,sink_window", "--budget", "32+128+32", "--page-size", "16", "--threads", "2", "--json", out],
      { cwd: ROOT, maxBuffer: 64 << 20 },
    );
    const run = JSON.parse(readFileSync(out, "utf8")) as { modes: ModeSummary[] };
    const by = Object.fromEntries(run.modes.map((m) => [m.mode, m]));
    const correct = (m: string) => by[m].correct;
    expect(by.dense.n).toBe(8);
    expect(correct("dense"), "dense answers most needles").toBeGreaterThanOrEqual(6);
    expect(correct("freekv"), "freekv within one task of dense").toBeGreaterThanOrEqual(correct("dense") - 1);
    expect(correct("sink_window"), "sink + window cannot reach the needles").toBeLessThanOrEqual(2);
    expect(correct("dense") - correct("sink_window")).toBeGreaterThanOrEqual(4);
    expect(by.freekv.retrieval.pages_recalled_per_step).toBeGreaterThan(0);
    expect(by.freekv.retrieval.corrections).toBeGreaterThan(0);
    expect(by.dense.retrieval.pages_recalled).toBe(0);
  });
});
