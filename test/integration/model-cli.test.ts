/**
 * The `freekv logits` and `freekv generate` commands as processes, held against the
 * transformers goldens: the last-position logits of the 300-token prompt, and the 40-token
 * greedy continuation with FreeKV (budget covering the context) and with dense attention.
 */
import { execFile } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { promisify } from "node:util";
import { describe, expect, it } from "vitest";

const run = promisify(execFile);
const ROOT = join(import.meta.dirname, "..", "..");
const MODEL = join(ROOT, "test", "fixtures", "models", "tiny-llama3");
const golden = JSON.parse(readFileSync(join(MODEL, "golden.json"), "utf8")) as { prompt: number[]; positions: number[]; logits: number[][]; continuation: number[] };
const TSX = join(ROOT, "node_modules", ".bin", "tsx");
const MAIN = join(ROOT, "tools", "cli", "main.ts");

async function freekv(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const r = await run(TSX, [MAIN, ...args], { cwd: ROOT, maxBuffer: 64 << 20 });
    return { code: 0, ...r };
  } catch (e) {
    const err = e as { code: number; stdout: string; stderr: string };
    return { code: err.code, stdout: err.stdout, stderr: err.stderr };
  }
}

describe("freekv logits / generate", () => {
  it("logits --json prints the last position's logits, equal to transformers'", async () => {
    const r = await freekv("logits", "--model", MODEL, "--tokens", golden.prompt.join(","), "--json");
    expect(r.code).toBe(0);
    const { logits } = JSON.parse(r.stdout) as { logits: number[] };
    const want = golden.logits[golden.positions.indexOf(golden.prompt.length - 1)];
    expect(logits).toHaveLength(want.length);
    expect(Math.max(...logits.map((x, i) => Math.abs(x - want[i])))).toBeLessThanOrEqual(1e-3);
  });

  it("generate --greedy --json continues the prompt as transformers does, with FreeKV and with dense attention", async () => {
    for (const mode of ["freekv", "dense"]) {
      const r = await freekv("generate", "--model", MODEL, "--tokens", golden.prompt.join(","), "--max-tokens", "40", "--greedy", "--json",
        "--mode", mode, "--page-size", "16", "--sink", "32", "--window", "32", "--select", "384");
      expect(r.code, r.stderr).toBe(0);
      const out = JSON.parse(r.stdout) as { tokens: number[]; attention: string; stats?: { decodeSteps: number } };
      expect(out.tokens).toEqual(golden.continuation);
      expect(out.attention).toBe("engine");
      expect(out.stats?.decodeSteps).toBe(39);
    }
  });

  it("names the problem and exits non-zero on bad input", async () => {
    const r = await freekv("generate", "--model", MODEL, "--tokens", "1,2,384", "--max-tokens", "3");
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/prompt.tokens\[2\]: token id 384 is out of range \[0, 384\)/);
    const m = await freekv("generate", "--model", MODEL, "--tokens", "1,2", "--max-tokens", "3", "--page-size", "16", "--sink", "20");
    expect(m.code).toBe(1);
    expect(m.stderr).toMatch(/--sink must be a multiple of --page-size/);
    const t = await freekv("generate", "--model", MODEL, "--prompt", "hi", "--max-tokens", "3");
    expect(t.stderr).toMatch(/no tokenizer.json: use --tokens/);
    const n = await freekv("logits", "--model", join(ROOT, "test", "fixtures"), "--tokens", "1");
    expect(n.code).toBe(1);
    expect(n.stderr).toMatch(/no config.json/);
  });
});
