/**
 * Aggregation, the JSON and SVG writers, the progress lines and the task file parser, on
 * synthetic results drawn from a seed (printed on failure; FREEKV_TEST_SEED replays it).
 */
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import type { ModeName } from "../../services/common/retrieval.js";
import { tokensLabel, toSvg, writeSvg } from "../../tools/eval/chart.js";
import { progress } from "../../tools/eval/progress.js";
import { NOT_EXPOSED, toJson, toTable, writeJson } from "../../tools/eval/report.js";
import type { TaskResult } from "../../tools/eval/run.js";
import { summarize } from "../../tools/eval/summary.js";
import { FAMILIES, parseTasks, TaskError } from "../../tools/eval/tasks.js";
import { wilsonInterval } from "../../tools/eval/wilson.js";
import { Prng, testSeed } from "../unit/reference/prng.js";
import { withEnv } from "../helpers/env.js";

const seed = testSeed();
const rng = new Prng(seed);
const why = `seed ${seed} (FREEKV_TEST_SEED)`;
const dir = mkdtempSync(join(tmpdir(), "freekv-eval-report-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const MODES: ModeName[] = ["dense", "freekv", "sink_window"];
const CONTEXTS = [1024, 4096, 16384];
const LAYERS = 3;
const EDGES = [0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99];
const RAW = new Map<string, number[][]>();

/** Random results: every family at every context, a random number of tasks each, random outcomes and counters. */
function syntheticResults(): TaskResult[] {
  const out: TaskResult[] = [];
  let id = 0;
  for (const family of FAMILIES)
    for (const ctx of CONTEXTS) {
      const count = 1 + rng.int(4);
      for (let t = 0; t < count; t++, id++)
        for (const mode of MODES) {
          const answers = 1 + rng.int(3);
          const found = Array.from({ length: answers }, () => rng.next() < (mode === "sink_window" ? 0.3 : 0.8));
          const failed = rng.next() < 0.05;
          const steps = failed ? 0 : 1 + rng.int(20);
          const selections = mode === "freekv" ? steps * 8 : 0;
          const selected = selections * 4;
          const hit = rng.int(selected + 1);
          // Per layer: raw group cosines (kept for the check) and the stats the engine would report.
          const raw: number[][] = [];
          const layers = Array.from({ length: LAYERS }, (_, layer) => {
            const cos = Array.from({ length: failed ? 0 : (steps - 1) * 2 }, () => (rng.next() < 0.7 ? 0.8 + 0.2 * rng.next() : -1 + 2 * rng.next()));
            raw.push(cos);
            const hist = new Array(EDGES.length + 1).fill(0);
            for (const c of cos) hist[EDGES.filter((e) => c >= e).length] += 1;
            const lsel = selections / LAYERS;
            return {
              layer,
              selections: lsel,
              corrections: rng.int(lsel + 1),
              correctionRate: 0,
              pagesSelected: lsel * 4,
              pagesHit: rng.int(lsel * 4 + 1),
              pagesRecalled: 0,
              hitRate: 0,
              cosineSamples: cos.length,
              cosineSum: cos.reduce((a, c) => a + c, 0),
              cosineSumSq: cos.reduce((a, c) => a + c * c, 0),
              cosineMean: 0,
              cosineMin: cos.length ? Math.min(...cos) : 0,
              cosineHistogram: hist,
              cosineBelowTau: cos.filter((c) => c < 0.9).length,
              overlapPages: 0,
              overlapBase: 0,
              overlap: 0,
            };
          });
          RAW.set(`${id}/${mode}`, raw);
          out.push({
            id: `task-${id}`,
            family,
            mode,
            seed: id,
            depth: rng.next(),
            context_tokens: ctx,
            prompt_tokens: ctx - rng.int(50),
            completion_tokens: failed ? 0 : steps + 1,
            finish_reason: failed ? "error" : "length",
            answer: found.map((_, i) => `a${i}`),
            text: "",
            correct: !failed && found.every(Boolean),
            found: failed ? found.map(() => false) : found,
            fraction: failed ? 0 : found.filter(Boolean).length / answers,
            prefill_ms: rng.next() * 100,
            decode_ms: rng.next() * 50,
            ...(failed
              ? { error: "synthetic failure" }
              : {
                  stats: {
                    decodeSteps: steps,
                    selections,
                    corrections: rng.int(selections + 1),
                    correctionRate: 0,
                    pagesSelected: selected,
                    pagesHit: hit,
                    pagesRecalled: selected - hit,
                    recallBytes: (selected - hit) * 16384,
                    pagesOffloaded: rng.int(100),
                    offloadBytes: 0,
                    hitRate: 0,
                    layers,
                    cosineBucketEdges: EDGES,
                  },
                }),
          });
        }
    }
  return out;
}

const results = syntheticResults();
const raw = (r: TaskResult, layer: number) => RAW.get(`${r.id.slice(5)}/${r.mode}`)![layer];
const summary = summarize(results, MODES);

describe("summarize", () => {
  it("one cell per family x context x mode, each counting its tasks, with its Wilson interval", () => {
    for (const family of FAMILIES)
      for (const ctx of CONTEXTS)
        for (const mode of MODES) {
          const rs = results.filter((r) => r.family === family && r.context_tokens === ctx && r.mode === mode);
          const c = summary.cells.find((z) => z.family === family && z.context_tokens === ctx && z.mode === mode);
          expect(c, why).toBeDefined();
          expect(c!.n, why).toBe(rs.length);
          expect(c!.correct, why).toBe(rs.filter((r) => r.correct).length);
          expect(c!.errors, why).toBe(rs.filter((r) => r.error).length);
          expect(c!.accuracy, why).toBe(c!.correct / c!.n);
          expect(c!.wilson95, why).toEqual(wilsonInterval(c!.correct, c!.n));
          expect(c!.answer_fraction, why).toBeCloseTo(rs.reduce((a, r) => a + r.fraction, 0) / rs.length, 12);
        }
    expect(summary.cells).toHaveLength((FAMILIES.length + 1) * CONTEXTS.length * MODES.length);
  });

  it("counts add up: families into 'all', contexts into the mode, every result counted once", () => {
    for (const mode of MODES) {
      let total = 0;
      for (const ctx of CONTEXTS) {
        const parts = summary.cells.filter((c) => c.family !== "all" && c.context_tokens === ctx && c.mode === mode);
        const all = summary.cells.find((c) => c.family === "all" && c.context_tokens === ctx && c.mode === mode)!;
        expect(all.n).toBe(parts.reduce((a, c) => a + c.n, 0));
        expect(all.correct).toBe(parts.reduce((a, c) => a + c.correct, 0));
        total += all.n;
      }
      const m = summary.modes.find((x) => x.mode === mode)!;
      expect(m.n).toBe(total);
      expect(m.n).toBe(results.filter((r) => r.mode === mode).length);
    }
  });

  it("per mode, the service's counters summed and divided per decode step", () => {
    for (const mode of MODES) {
      const rs = results.filter((r) => r.mode === mode && r.stats);
      const sum = (f: (s: NonNullable<TaskResult["stats"]>) => number) => rs.reduce((a, r) => a + f(r.stats!), 0);
      const m = summary.modes.find((x) => x.mode === mode)!.retrieval;
      expect(m.decode_steps).toBe(sum((s) => s.decodeSteps));
      expect(m.correction_rate).toBe(sum((s) => s.selections) ? sum((s) => s.corrections) / sum((s) => s.selections) : 0);
      expect(m.pages_recalled_per_step).toBeCloseTo(sum((s) => s.pagesRecalled) / sum((s) => s.decodeSteps), 12);
      expect(m.recall_bytes_per_step).toBeCloseTo(sum((s) => s.recallBytes) / sum((s) => s.decodeSteps), 9);
      expect(m.hit_rate).toBe(sum((s) => s.pagesSelected) ? sum((s) => s.pagesHit) / sum((s) => s.pagesSelected) : 0);
    }
    expect(summary.modes.find((x) => x.mode === "dense")!.retrieval.correction_rate).toBe(0);
  });

  it("per family and selecting mode, the counters of that family's requests only; modes that select nothing are left out", () => {
    for (const family of FAMILIES)
      for (const mode of MODES) {
        const rs = results.filter((r) => r.mode === mode && r.family === family && r.stats);
        const sum = (f: (s: NonNullable<TaskResult["stats"]>) => number) => rs.reduce((a, r) => a + f(r.stats!), 0);
        const f = summary.families.find((x) => x.family === family && x.mode === mode);
        if (sum((s) => s.selections) === 0) {
          expect(f, why).toBeUndefined();
          continue;
        }
        expect(f, why).toBeDefined();
        expect(f!.decode_steps).toBe(sum((s) => s.decodeSteps));
        expect(f!.correction_rate).toBe(sum((s) => s.corrections) / sum((s) => s.selections));
        expect(f!.pages_recalled_per_step).toBeCloseTo(sum((s) => s.pagesRecalled) / sum((s) => s.decodeSteps), 12);
        expect(f!.hit_rate).toBe(sum((s) => s.pagesSelected) ? sum((s) => s.pagesHit) / sum((s) => s.pagesSelected) : 0);
      }
    expect(summary.families.some((f) => f.mode === "freekv")).toBe(true);
    expect(summary.families.some((f) => f.mode === "dense")).toBe(false);
    const text = toTable(summary);
    for (const f of summary.families) expect(text).toMatch(new RegExp(`^${f.family}\\s+${f.mode}\\s+${f.decode_steps}\\s`, "m"));
  });

  it("per mode and layer, the cosine's mean, spread, minimum and fraction below tau of every raw sample", () => {
    for (const mode of MODES) {
      const m = summary.modes.find((x) => x.mode === mode)!.retrieval;
      expect(m.layers.map((l) => l.layer)).toEqual([...Array(LAYERS).keys()]);
      for (let layer = 0; layer < LAYERS; layer++) {
        const all = results.filter((r) => r.mode === mode && r.stats).flatMap((r) => raw(r, layer));
        const l = m.layers[layer];
        const mean = all.reduce((a, c) => a + c, 0) / all.length;
        expect(l.cosine_samples).toBe(all.length);
        expect(l.cosine_mean).toBeCloseTo(mean, 12);
        expect(l.cosine_std).toBeCloseTo(Math.sqrt(all.reduce((a, c) => a + (c - mean) ** 2, 0) / all.length), 9);
        expect(l.cosine_min).toBe(Math.min(...all));
        expect(l.cosine_below_tau_fraction).toBeCloseTo(all.filter((c) => c < 0.9).length / all.length, 12);
        expect(l.cosine_histogram.reduce((a, c) => a + c, 0)).toBe(all.length);
        const rs = results.filter((r) => r.mode === mode && r.stats);
        const sel = rs.reduce((a, r) => a + r.stats!.layers[layer].selections, 0);
        expect(l.correction_rate).toBe(sel ? rs.reduce((a, r) => a + r.stats!.layers[layer].corrections, 0) / sel : 0);
      }
    }
  });

  it("the table has a row per family and context and a column per mode", () => {
    const text = toTable(summary);
    for (const f of [...FAMILIES, "all"]) for (const ctx of CONTEXTS) expect(text).toMatch(new RegExp(`^${f}\\s+${ctx}\\s`, "m"));
    const header = text.split("\n")[1];
    for (const m of MODES) expect(header).toContain(m);
    for (const m of MODES) expect(text).toMatch(new RegExp(`^${m}\\s+\\d`, "m"));
  });
});

describe("JSON writer", () => {
  it("writes machine, commit, date, model, command, settings, cells and every result", () => {
    const file = join(dir, "sub", "run.json");
    const startedAt = new Date();
    // The addon's settings in the environment go beside the figures; other FREEKV_* variables
    // (which may hold credentials) do not.
    const doc = withEnv("FREEKV_RESIDENT_FACTOR", "3", () => withEnv("FREEKV_DIRECTORY", "redis://user:secret@host:6379", () => toJson(
      {
        command: ["freekv", "eval", "--tasks", "x.jsonl"],
        tasksFile: "/abs/x.jsonl",
        model: { dir: "/models/m", architecture: "LlamaForCausalLM" },
        target: "in process",
        backend: "cpu",
        settings: { requested: { sink_tokens: 32 } },
        concurrency: 2,
        startedAt,
        seconds: 1.5,
      },
      summary,
      results,
    )));
    writeJson(file, doc);
    const back = JSON.parse(readFileSync(file, "utf8"));
    expect(back.tool).toBe("freekv eval");
    expect(back.date).toBe(startedAt.toISOString());
    expect(back.commit === null || /^[0-9a-f]{40}(\+dirty)?$/.test(back.commit)).toBe(true);
    expect(back.machine.cpus).toBeGreaterThan(0);
    expect(typeof back.machine.node).toBe("string");
    expect(back.command).toEqual(["freekv", "eval", "--tasks", "x.jsonl"]);
    expect(back.model.dir).toBe("/models/m");
    expect(back.tasks.count).toBe(new Set(results.map((r) => r.id)).size);
    expect(back.results).toHaveLength(results.length);
    expect(back.cells).toHaveLength(summary.cells.length);
    expect(back.modes.map((m: { mode: string }) => m.mode)).toEqual(MODES);
    expect(back.not_exposed).toEqual(NOT_EXPOSED);
    expect(back.native_settings.FREEKV_RESIDENT_FACTOR).toBe("3");
    expect(JSON.stringify(back)).not.toContain("secret");
  });
});

/** Checks that every element is closed in order (a well-formedness check without a parser). */
function expectBalanced(svg: string): void {
  const stack: string[] = [];
  for (const m of svg.matchAll(/<(\/?)([a-zA-Z]+)([^>]*?)(\/?)>/g)) {
    const [, close, name, , self] = m;
    if (self) continue;
    if (close) expect(stack.pop(), `</${name}>`).toBe(name);
    else stack.push(name);
  }
  expect(stack).toEqual([]);
}

describe("SVG chart", () => {
  it("one series per mode, one point per context with the cell's accuracy and Wilson interval on one y scale", () => {
    const svg = toSvg(summary, "title <with> & \"marks\"");
    expect(svg.startsWith("<svg xmlns=\"http://www.w3.org/2000/svg\"")).toBe(true);
    expectBalanced(svg);
    expect(svg).toContain("title &lt;with&gt; &amp; &quot;marks&quot;");
    const groups = [...svg.matchAll(/<g class="mode" data-mode="([^"]+)"[^>]*>([\s\S]*?)<\/g>/g)];
    expect(groups.map((g) => g[1])).toEqual(MODES);
    // y = a + b * accuracy for every point and error bar end, with b < 0 (up is better).
    const pts: { acc: number; y: number }[] = [];
    for (const [, mode, body] of groups) {
      const circles = [...body.matchAll(/<line x1="([\d.]+)" y1="([\d.]+)" x2="[\d.]+" y2="([\d.]+)"[^>]*\/>\s*<circle cx="([\d.]+)" cy="([\d.]+)"/g)];
      const cells = summary.cells.filter((c) => c.family === "all" && c.mode === mode).sort((a, b) => a.context_tokens - b.context_tokens);
      expect(circles).toHaveLength(cells.length);
      circles.forEach((c, i) => {
        pts.push({ acc: cells[i].accuracy, y: Number(c[5]) }, { acc: cells[i].wilson95[0], y: Number(c[2]) }, { acc: cells[i].wilson95[1], y: Number(c[3]) });
      });
      const xs = circles.map((c) => Number(c[4]));
      expect([...xs].sort((a, b) => a - b)).toEqual(xs); // increasing context left to right
      expect(body.match(/<polyline/g)).toHaveLength(1);
    }
    const lo = pts.reduce((a, p) => (p.acc < a.acc ? p : a));
    const hi = pts.reduce((a, p) => (p.acc > a.acc ? p : a));
    expect(hi.acc, why).toBeGreaterThan(lo.acc);
    const b = (hi.y - lo.y) / (hi.acc - lo.acc);
    expect(b).toBeLessThan(0);
    for (const p of pts) expect(Math.abs(p.y - (lo.y + b * (p.acc - lo.acc))), why).toBeLessThan(0.2); // coordinates are rounded to 0.1
    const file = join(dir, "chart", "c.svg");
    writeSvg(file, svg);
    expect(readFileSync(file, "utf8")).toBe(svg);
  });

  it("labels context lengths", () => {
    expect([512, 1024, 1536, 4096, 131072, 1 << 20, 1000].map(tokensLabel)).toEqual(["512", "1K", "1.5K", "4K", "128K", "1M", "1000"]);
  });
});

describe("progress", () => {
  const sink = (isTTY: boolean) => {
    const writes: string[] = [];
    return { isTTY, writes, write: (s: string) => writes.push(s) };
  };

  it("plain lines off a terminal, one per tenth, the last one with the total", () => {
    const s = sink(false);
    const p = progress("eval", s);
    for (let i = 1; i <= 37; i++) p.update(i, 37, Math.floor(i / 2));
    p.done();
    expect(s.writes.every((w) => w.endsWith("\n") && !w.includes("\r"))).toBe(true);
    expect(s.writes).toHaveLength(10);
    expect(s.writes.at(-1)).toContain("37/37 requests, 48.6% correct");
  });

  it("a bar redrawn in place on a terminal, cleared at the end", () => {
    const s = sink(true);
    const p = progress("eval", s);
    p.update(1, 4, 1);
    p.update(4, 4, 2);
    p.done();
    expect(s.writes).toHaveLength(3);
    expect(s.writes[0].startsWith("\r")).toBe(true);
    expect(s.writes[1]).toContain("4/4 50.0% correct");
    expect(s.writes[2]).toBe("\r\x1b[K");
  });
});

describe("task files", () => {
  const line = (o: Record<string, unknown>) =>
    JSON.stringify({ id: "a", family: "single_needle", seed: 1, context_tokens: 100, depth: 0.5, prompt: "p", answer: ["x"], max_tokens: 4, ...o });

  it("parses lines, skipping blank ones, keeping the chat flag", () => {
    const ts = parseTasks([line({}), "", line({ id: "b", chat: true, answer: ["x", "y"] })].join("\n"));
    expect(ts.map((t) => t.id)).toEqual(["a", "b"]);
    expect(ts[1].chat).toBe(true);
    expect(ts[0].chat).toBeUndefined();
    expect(ts[1].answer).toEqual(["x", "y"]);
  });

  it("names the line and the field of a bad task", () => {
    const bad: [string, RegExp][] = [
      ["{not json", /f:1: not JSON/],
      [line({ family: "aggregation" }), /f:1: family must be one of/],
      [line({ depth: 1.5 }), /f:1: depth/],
      [line({ answer: [] }), /f:1: answer/],
      [line({ answer: ["ok", ""] }), /f:1: answer/],
      [line({ max_tokens: 0 }), /f:1: max_tokens/],
      [line({ context_tokens: 1.5 }), /f:1: context_tokens/],
      [line({ prompt: "" }), /f:1: prompt/],
      [line({}) + "\n" + line({}), /f:2: id "a" appears twice/],
    ];
    for (const [text, re] of bad) expect(() => parseTasks(text, "f")).toThrow(re);
    expect(() => parseTasks("[1]", "f")).toThrow(TaskError);
  });
});
