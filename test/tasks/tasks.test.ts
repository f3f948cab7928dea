import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { describe, expect, it } from "vitest";
import { Filler } from "../../tools/tasks/filler.js";
import { FAMILIES, generateTask, scoreOutput, type Family, type Task } from "../../tools/tasks/generate.js";
import { parseArgs, tasks } from "../../tools/tasks/main.js";
import { Rng } from "../../tools/tasks/rng.js";

// A small deterministic filler text: numbered sentences so positions can be checked.
const TEXT = Array.from({ length: 400 }, (_, p) =>
  Array.from({ length: 5 }, (_, s) => `Sentence ${s} of paragraph ${p} tells a short and quiet story about the harbor.`).join(" "),
).join("\n");
const filler = new Filler(TEXT);

function task(family: Family, index: number, depth?: number, chars = 6000): Task {
  return generateTask(filler, { seed: 11, family, depth, contextChars: chars, contextTokens: Math.round(chars / 3.6) }, index);
}

/** The needle sentences in the context part of a prompt. */
function needles(t: Task): string[] {
  const context = t.prompt.slice(0, t.prompt.lastIndexOf("\n\nQ: "));
  return context.match(/(The value of key \S+ is \d+\.|VAR [A-Z]{5} = (?:VAR [A-Z]{5}|\d+)\.|Record \S+: value \d+, next \S+\.)/g) ?? [];
}

describe("task generator", () => {
  it("is deterministic per (seed, index) and differs across seeds", () => {
    for (const f of FAMILIES) {
      expect(task(f, 3)).toEqual(task(f, 3));
      expect(task(f, 3).prompt).not.toEqual(task(f, 4).prompt);
    }
    const a = generateTask(filler, { seed: 1, family: "single_needle", contextChars: 3000, contextTokens: 800 }, 0);
    const b = generateTask(filler, { seed: 2, family: "single_needle", contextChars: 3000, contextTokens: 800 }, 0);
    expect(a.prompt).not.toEqual(b.prompt);
  });

  it("has the documented schema and a fixed question format", () => {
    for (const f of FAMILIES) {
      const t = task(f, 1);
      expect(Object.keys(t).sort()).toEqual(
        ["answer", "context_chars", "context_tokens", "depth", "family", "id", "index", "max_tokens", "needle_depths", "prompt", "seed", "target"].sort(),
      );
      expect(t.family).toBe(f);
      expect(t.prompt).toMatch(/\n\nQ: [^\n]+ A:$/);
      expect(t.target.startsWith(" ") && t.target.endsWith(".")).toBe(true);
      expect(t.answer.length).toBeGreaterThan(0);
      expect(t.max_tokens).toBeGreaterThan(t.target.length / 2);
      expect(t.depth).toBeGreaterThanOrEqual(0);
      expect(t.depth).toBeLessThanOrEqual(1);
      // Length: close to the requested number of characters.
      expect(Math.abs(t.prompt.length - t.context_chars)).toBeLessThan(200);
    }
  });

  it("puts every answer in the prompt's needles, and the target scores as correct", () => {
    for (const f of FAMILIES)
      for (let i = 0; i < 20; i++) {
        const t = task(f, i);
        const ns = needles(t).join(" ");
        for (const a of t.answer) expect(ns).toContain(a);
        expect(scoreOutput(t.answer, t.target)).toEqual({ hits: t.answer.length, total: t.answer.length, allInOrder: true });
      }
  });

  it("answers exactly what the needles say", () => {
    for (let i = 0; i < 20; i++) {
      const s = task("single_needle", i);
      const key = /key (\S+)\?/.exec(s.prompt)![1];
      expect(needles(s)).toEqual([`The value of key ${key} is ${s.answer[0]}.`]);
      const mv = task("multi_value", i);
      const k = /key (\S+)\?/.exec(mv.prompt)![1];
      const vals = needles(mv).filter((n) => n.includes(`key ${k} `)).map((n) => /is (\d+)\./.exec(n)![1]);
      expect(vals).toEqual(mv.answer); // all values, in text order
      const vt = task("variable_tracking", i);
      const value = /value (\d+)\?/.exec(vt.prompt)![1];
      const assigned = new Set<string>();
      for (const n of needles(vt)) {
        const m = /VAR ([A-Z]{5}) = (?:VAR ([A-Z]{5})|(\d+))\./.exec(n)!;
        if (m[3] === value || (m[2] && assigned.has(m[2]))) assigned.add(m[1]);
      }
      expect([...assigned]).toEqual(vt.answer);
    }
  });

  it("places the first answer needle at the requested depth", () => {
    for (const f of FAMILIES)
      for (const d of [0, 0.1, 0.25, 0.5, 0.75, 0.9, 1]) {
        const t = task(f, 5, d, 20000);
        // Needles go between sentences: within about one sentence (~85 chars) plus needles of 20000.
        expect(Math.abs(t.depth - d)).toBeLessThan(0.03);
        expect(Math.min(...t.needle_depths)).toBe(t.depth);
        for (const nd of t.needle_depths) expect(nd).toBeGreaterThanOrEqual(t.depth);
      }
  });

  it("the CLI options give a families x depths grid and token lengths from chars per token", () => {
    const path = join(mkdtempSync(join(tmpdir(), "tasks-")), "corpus.txt");
    writeFileSync(path, TEXT);
    const a = parseArgs(["--corpus", path, "--seed", "3", "--count", "12", "--context-tokens", "500", "--chars-per-token", "4", "--families", "single_needle,multi_key:2", "--depths", "0.2,0.8"]);
    const ts = [...tasks(filler, a)];
    const cycle = ["single_needle", "multi_key", "multi_key"];
    expect(ts.map((t) => t.family)).toEqual(Array.from({ length: 12 }, (_, i) => cycle[i % 3]));
    expect(ts.slice(0, 3).every((t) => Math.abs(t.depth - 0.2) < 0.1)).toBe(true);
    expect(ts.slice(3, 6).every((t) => Math.abs(t.depth - 0.8) < 0.1)).toBe(true);
    expect(ts.every((t) => t.context_tokens === 500 && t.context_chars === 2000)).toBe(true);
  });

  it("the CLI writes the same JSONL for the same seed", () => {
    const dir = mkdtempSync(join(tmpdir(), "tasks-"));
    const corpus = join(dir, "corpus.txt");
    writeFileSync(corpus, TEXT);
    const main = resolve("tools/tasks/main.ts");
    const run = (out: string, seed: string) =>
      execFileSync(process.execPath, ["--import", "tsx", main, "--corpus", corpus, "--seed", seed, "--count", "6", "--context-tokens", "200:400", "--out", out]);
    run(join(dir, "a.jsonl"), "5");
    run(join(dir, "b.jsonl"), "5");
    run(join(dir, "c.jsonl"), "6");
    const a = readFileSync(join(dir, "a.jsonl"), "utf8");
    expect(a).toEqual(readFileSync(join(dir, "b.jsonl"), "utf8"));
    expect(a).not.toEqual(readFileSync(join(dir, "c.jsonl"), "utf8"));
    const lines = a.trim().split("\n").map((l) => JSON.parse(l) as Task);
    expect(lines.map((t) => t.family)).toEqual([...FAMILIES]);
    expect(lines.every((t) => t.context_tokens >= 200 && t.context_tokens <= 400)).toBe(true);
  });

  it("the generator's numbers do not depend on the platform", () => {
    const r = new Rng(1, 2, 3);
    expect([r.u32(), r.u32(), r.u32()]).toEqual([3897538385, 2358554260, 1137108892]);
  });
});
