/**
 * `freekv eval` end to end as a process: it starts the kvstore and compute services with the
 * built-in model and runs tasks through Generate. The tiny random model answers nothing, so the
 * tasks are made from what it generates: a first dense run gives each prompt's greedy text, which
 * becomes the expected answer of a second run. Dense must then score 1.0, a twin task with one
 * answer that is not in the text must score 0 with half its answers found, and sink_window with a
 * 96-token budget over prompts several times longer must score lower than dense. Prompts are random
 * text from a seed (printed on failure; FREEKV_TEST_SEED replays it).
 */
import { execFile } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, describe, expect, it } from "vitest";
import { loadTextCodec } from "../../services/compute/model/tokenizer.js";
import type { TaskResult } from "../../tools/eval/run.js";
import { ORDERED_FAMILIES } from "../../tools/eval/score.js";
import type { Cell, ModeSummary } from "../../tools/eval/summary.js";
import { FAMILIES, type Task } from "../../tools/eval/tasks.js";
import { Prng, testSeed } from "../unit/reference/prng.js";
import { QUIET, startTiers } from "../helpers/services.js";

const execFileP = promisify(execFile);
const ROOT = join(import.meta.dirname, "..", "..");
const MODEL = join(ROOT, "models", "builtin");
const TSX = join(ROOT, "node_modules", ".bin", "tsx");
const MAIN = join(ROOT, "tools", "cli", "main.ts");
const seed = testSeed();
const why = `seed ${seed} (FREEKV_TEST_SEED)`;
const dir = mkdtempSync(join(tmpdir(), "freekv-eval-cli-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

async function freekv(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const r = await execFileP(TSX, [MAIN, ...args], { cwd: ROOT, maxBuffer: 64 << 20, env: { ...process.env, FREEKV_THREADS: "1" } });
    return { code: 0, ...r };
  } catch (e) {
    const err = e as { code: number; stdout: string; stderr: string };
    return { code: err.code, stdout: err.stdout, stderr: err.stderr };
  }
}

interface RunJson {
  target: string;
  modes: ModeSummary[];
  cells: Cell[];
  results: TaskResult[];
  command: string[];
  model: { dir: string; geometry?: { layers: number } };
  settings: { resolved: Record<string, { sink_tokens: number; mode: string } | undefined> };
}

const writeTasks = (file: string, tasks: Task[]) => writeFileSync(file, tasks.map((t) => JSON.stringify(t)).join("\n") + "\n");

/** Random lowercase words until the prompt has at least `tokens` tokens of the built-in model. */
function randomPrompt(rng: Prng, tokens: number): string {
  const codec = loadTextCodec(MODEL)!;
  const words: string[] = [];
  const word = () => Array.from({ length: 2 + rng.int(7) }, () => String.fromCharCode(97 + rng.int(26))).join("");
  while (codec.encode(words.join(" "), true).length < tokens) for (let i = 0; i < 16; i++) words.push(word());
  return `${words.join(" ")}\nThe answer is:`;
}

/** Letters that do not occur in `text`. */
function absentFrom(text: string, rng: Prng): string {
  for (;;) {
    const s = Array.from({ length: 20 }, () => String.fromCharCode(65 + rng.int(26))).join("");
    if (!text.includes(s)) return s;
  }
}

describe("freekv eval", () => {
  it("refuses bad options with exit code 2 before starting anything", async () => {
    const tasks = join(dir, "one.jsonl");
    writeTasks(tasks, [{ id: "a", family: "single_needle", seed: 1, context_tokens: 10, depth: 0, prompt: "p", answer: ["x"], max_tokens: 1 }]);
    for (const args of [[], ["--tasks", tasks, "--modes", "dense,nope"], ["--tasks", tasks, "--budget", "512+1024"], ["--tasks", tasks, "--target", "nohost"], ["--tasks", join(dir, "missing.jsonl")]]) {
      const r = await freekv("eval", ...args);
      expect(r.code, `${args.join(" ")}: ${r.stderr}`).toBe(2);
      expect(r.stderr).toMatch(/^freekv eval: /);
    }
  });

  it("scores dense 1.0 on its own greedy output, a missing answer 0, and a starved sink_window lower", async () => {
    const rng = new Prng(seed);
    const first: Task[] = FAMILIES.map((family, i) => ({
      id: `t${i}`,
      family,
      seed: seed + i,
      context_tokens: i % 2 ? 768 : 320,
      depth: rng.next(),
      prompt: randomPrompt(rng, i % 2 ? 768 : 320),
      answer: ["placeholder"],
      max_tokens: 10,
    }));
    const extra: Task = { ...first[0], id: "beyond-the-limit" };
    const firstFile = join(dir, "first.jsonl");
    writeTasks(firstFile, [...first, extra]);
    const firstJson = join(dir, "first.json");
    const r1 = await freekv("eval", "--model", MODEL, "--tasks", firstFile, "--modes", "dense", "--limit", String(first.length), "--json", firstJson);
    expect(r1.code, r1.stderr).toBe(0);
    const run1 = JSON.parse(readFileSync(firstJson, "utf8")) as RunJson;
    expect(run1.results.map((r) => r.id)).toEqual(first.map((t) => t.id)); // --limit
    const greedy = new Map(run1.results.map((r) => [r.id, r.text]));

    // The expected answers are the dense generation (in two ordered halves where the family is
    // ordered); each twin also expects a string that is not in the generation.
    const second: Task[] = [];
    for (const t of first) {
      const text = greedy.get(t.id)!;
      if (text.length < 2) continue;
      const half = Math.floor(text.length / 2);
      const answer = ORDERED_FAMILIES.has(t.family) ? [text.slice(0, half), text.slice(half)] : [text];
      second.push({ ...t, answer });
      second.push({ ...t, id: `${t.id}-miss`, answer: [answer[0], absentFrom(text, rng)] });
    }
    expect(second.length, `the model generated (almost) nothing: ${why}`).toBeGreaterThanOrEqual(8);
    const secondFile = join(dir, "second.jsonl");
    writeTasks(secondFile, second);
    const json = join(dir, "second.json");
    const svg = join(dir, "second.svg");
    const modes = ["dense", "freekv", "sink_window"];
    const r2 = await freekv("eval", "--model", MODEL, "--tasks", secondFile, "--modes", modes.join(","), "--budget", "32+32+32", "--concurrency", "2", "--json", json, "--svg", svg);
    expect(r2.code, r2.stderr).toBe(0);
    const run = JSON.parse(readFileSync(json, "utf8")) as RunJson;
    expect(run.command.slice(0, 2)).toEqual(["freekv", "eval"]);
    expect(run.model.geometry?.layers).toBe(4);
    for (const m of modes) expect(run.settings.resolved[m]).toMatchObject({ mode: m, sink_tokens: 32 });

    // Every task in every mode, once.
    expect(run.results).toHaveLength(second.length * modes.length);
    for (const m of modes) expect(run.results.filter((r) => r.mode === m).map((r) => r.id)).toEqual(second.map((t) => t.id));
    const res = (mode: string, id: string) => run.results.find((r) => r.mode === mode && r.id === id)!;

    // Dense: its own output again (same greedy text, also with two requests in flight).
    for (const t of second) {
      const r = res("dense", t.id);
      expect(r.error, why).toBeUndefined();
      expect(r.text, `${t.id}: ${why}`).toBe(greedy.get(t.id.replace(/-miss$/, "")));
      if (t.id.endsWith("-miss")) {
        expect(r.correct, why).toBe(false);
        expect(r.found, why).toEqual([true, false]);
        expect(r.fraction, why).toBe(0.5);
      } else {
        expect(r.correct, `${t.id} ${JSON.stringify(r.text)} ${JSON.stringify(t.answer)}: ${why}`).toBe(true);
        expect(r.fraction).toBe(1);
      }
    }
    const byMode = new Map(run.modes.map((m) => [m.mode, m]));
    const dense = byMode.get("dense")!;
    expect(dense.n).toBe(second.length);
    expect(dense.correct).toBe(second.length / 2);
    expect(dense.answer_fraction).toBeCloseTo(0.75, 12);
    // Only the tasks whose answer is the dense text can be right: per family, dense scores 1.0 on them.
    for (const f of new Set(second.map((t) => t.family))) {
      const good = run.results.filter((r) => r.mode === "dense" && r.family === f && !r.id.endsWith("-miss"));
      expect(good.every((r) => r.correct)).toBe(true);
    }

    // The starved budget changes what the model sees, so some of its answers are lost.
    const sw = byMode.get("sink_window")!;
    expect(run.results.some((r) => r.mode === "sink_window" && r.text !== greedy.get(r.id.replace(/-miss$/, ""))), `sink_window generated dense's text everywhere: ${why}`).toBe(true);
    expect(sw.accuracy, why).toBeLessThan(dense.accuracy);
    for (const r of run.results.filter((x) => x.mode !== "dense" && x.id.endsWith("-miss"))) expect(r.correct).toBe(false);

    // Counts add up: families into the "all" row per context, contexts into the mode.
    for (const m of modes) {
      const cells = run.cells.filter((c) => c.mode === m);
      const contexts = [...new Set(cells.map((c) => c.context_tokens))];
      expect(contexts.sort((a, b) => a - b)).toEqual([320, 768]);
      let n = 0;
      for (const ctx of contexts) {
        const all = cells.find((c) => c.family === "all" && c.context_tokens === ctx)!;
        const parts = cells.filter((c) => c.family !== "all" && c.context_tokens === ctx);
        expect(all.n).toBe(parts.reduce((a, c) => a + c.n, 0));
        expect(all.correct).toBe(parts.reduce((a, c) => a + c.correct, 0));
        expect(all.prompt_tokens_mean).toBeGreaterThanOrEqual(ctx);
        n += all.n;
      }
      expect(n).toBe(byMode.get(m as ModeSummary["mode"])!.n);
      for (const f of new Set(second.map((t) => t.family))) expect(cells.some((c) => c.family === f)).toBe(true);
    }

    // What the service reported of its retrieval.
    expect(dense.retrieval.pages_recalled).toBe(0);
    expect(dense.retrieval.selections).toBe(0);
    expect(sw.retrieval.selections).toBe(0);
    const fk = byMode.get("freekv")!.retrieval;
    expect(fk.decode_steps).toBeGreaterThan(0);
    expect(fk.selections).toBeGreaterThan(0);
    expect(fk.correction_rate).toBeGreaterThanOrEqual(0);
    expect(fk.correction_rate).toBeLessThanOrEqual(1);
    expect(fk.pages_recalled_per_step).toBe(fk.pages_recalled / fk.decode_steps);

    // The table and the chart.
    for (const m of modes) expect(r2.stdout).toMatch(new RegExp(`^${m}\\s+\\d`, "m"));
    for (const f of new Set(second.map((t) => t.family))) expect(r2.stdout).toMatch(new RegExp(`^${f}\\s+(320|768)\\s`, "m"));
    expect(r2.stderr).toMatch(/freekv eval: \d+\/\d+ requests/); // plain progress lines: stderr is a pipe here
    const chart = readFileSync(svg, "utf8");
    expect([...chart.matchAll(/<g class="mode" data-mode="([^"]+)"/g)].map((m) => m[1])).toEqual(modes);
  });

  it("--target sends the same requests to a compute service already running", async () => {
    const rng = new Prng(seed ^ 0x5bd1e995);
    const tasks: Task[] = ["single_needle", "multi_query"].map((family, i) => ({
      id: `r${i}`,
      family: family as Task["family"],
      seed: i,
      context_tokens: 200,
      depth: 0.5,
      prompt: randomPrompt(rng, 200),
      answer: ["placeholder"],
      max_tokens: 6,
    }));
    const file = join(dir, "target.jsonl");
    writeTasks(file, tasks);
    const local = join(dir, "local.json");
    const r1 = await freekv("eval", "--model", MODEL, "--tasks", file, "--modes", "dense", "--json", local);
    expect(r1.code, r1.stderr).toBe(0);
    const tiers = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...QUIET, FREEKV_MODEL: MODEL, FREEKV_THREADS: "1" } });
    try {
      const refused = await freekv("eval", "--tasks", file, "--target", tiers.compute.address, "--backend", "cuda");
      expect(refused.code).toBe(2);
      const remote = join(dir, "remote.json");
      const r2 = await freekv("eval", "--model", MODEL, "--tasks", file, "--modes", "dense,freekv", "--target", tiers.compute.address, "--json", remote);
      expect(r2.code, r2.stderr).toBe(0);
      const a = JSON.parse(readFileSync(local, "utf8")) as RunJson;
      const b = JSON.parse(readFileSync(remote, "utf8")) as RunJson;
      expect(a.target).toBe("in process");
      expect(b.target).toBe(tiers.compute.address);
      expect(b.results).toHaveLength(4);
      // Same model, same prompts, greedy: the same dense text either way.
      for (const t of tasks) expect(b.results.find((r) => r.mode === "dense" && r.id === t.id)!.text).toBe(a.results.find((r) => r.id === t.id)!.text);
    } finally {
      await tiers.stop();
    }
  });
});
