/**
 * scripts/gpu/nsys-step.py, the reader of a runner's Nsight Systems trace, on a synthetic trace in
 * the export's SQLite schema (StringIds, CUPTI_ACTIVITY_KIND_KERNEL / MEMCPY) whose figures are
 * known by construction: random durations, a prompt chunk between two runs of decode steps, a main
 * stream (the one with the decode attention) and a side stream whose gathers overlap the main
 * stream's by a chosen amount. Skipped, saying so, where python3 lacks its sqlite3 module.
 */
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { prng } from "../helpers/prng.js";

const ROOT = join(import.meta.dirname, "..", "..");
const SCRIPT = join(ROOT, "scripts", "gpu", "nsys-step.py");
const python = ["/usr/bin/python3", "python3"].find((p) => spawnSync(p, ["-c", "import sqlite3"], { stdio: "ignore" }).status === 0);
if (!python) console.warn("nsys-step test skipped: no python3 with sqlite3");
const dir = mkdtempSync(join(tmpdir(), "freekv-nsys-step-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const seed = Number(process.env.FREEKV_TEST_SEED) || (Date.now() ^ (process.pid << 3)) >>> 0;
const rand = prng(seed);
const int = (lo: number, hi: number) => lo + Math.floor(rand() * (hi - lo + 1));

type Op = { start: number; end: number; stream: number; name: string; table?: "memcpy" };
const MAIN = 7;
const SIDE = 13;

/** Expected figures of one decode step, summed as the trace is laid out. */
type Expect = { span: number; enginePath: number; engineIdle: number; gatherMain: number; gatherSide: number; both: number; layers: number };

/**
 * One decode step from t: per layer, GEMM, RoPE, [copy, correction, gather, idle gap, table],
 * attention, combine; with the side stream's gather placed to overlap the layer's main gather by
 * `overlap` ns (when speculative). Returns its ops, the expected figures and the time it ends.
 */
function decodeStep(t: number, layers: number, speculative: boolean): { ops: Op[]; exp: Expect; end: number } {
  const ops: Op[] = [];
  const exp: Expect = { span: 0, enginePath: 0, engineIdle: 0, gatherMain: 0, gatherSide: 0, both: 0, layers };
  const t0 = t;
  const put = (stream: number, name: string, d: number, table?: "memcpy") => {
    ops.push({ start: t, end: t + d, stream, name, table });
    t += d;
  };
  put(MAIN, "EmbedKernel", int(2_000, 4_000));
  for (let l = 0; l < layers; l++) {
    put(MAIN, "nvjet_tst_128x64_64x4_2x1_v_bz_TNN", int(20_000, 60_000));
    put(MAIN, "BiasRopeSplitKernel", int(1_000, 3_000));
    const ropeEnd = t;
    const gap0 = int(0, 2_000);
    t += gap0;
    put(MAIN, "memcpy", int(1_000, 2_000), "memcpy");
    put(MAIN, "CorrectionKernel", int(2_000, 5_000));
    const g0 = t;
    const gd = int(10_000, 40_000);
    put(MAIN, "RecallGatherBatchKernel", gd);
    exp.gatherMain += gd;
    if (speculative) {
      // The side stream's gather: starts inside the main gather, runs `ov` ns alongside it.
      const ov = int(1_000, gd - 1_000);
      const sd = ov + int(0, 20_000);
      ops.push({ start: g0 + gd - ov, end: g0 + gd - ov + sd, stream: SIDE, name: "RecallGatherBatchKernel" });
      ops.push({ start: g0 + gd - ov + sd, end: g0 + gd - ov + sd + 3_000, stream: SIDE, name: "SelectionScoreKernel" });
      exp.gatherSide += sd;
      exp.both += ov;
    }
    const idle = int(500, 9_000);
    t += idle;
    put(MAIN, "AttendTableKernel", int(1_000, 3_000));
    exp.enginePath += t - ropeEnd;
    exp.engineIdle += gap0 + idle;
    put(MAIN, "DecodeAttentionWarpKernel", int(5_000, 20_000));
    put(MAIN, "DecodeCombineKernel", int(1_000, 2_000));
  }
  put(MAIN, "ArgmaxRowsKernel", int(2_000, 5_000));
  // The side ops of the last layer may end after the main stream: the step's span is the main's.
  exp.span = t - t0;
  const sideEnd = Math.max(t, ...ops.filter((o) => o.stream === SIDE).map((o) => o.end));
  return { ops, exp, end: sideEnd + int(10_000, 50_000) };
}

function writeTrace(path: string, ops: Op[]): void {
  const names = [...new Set(ops.filter((o) => !o.table).map((o) => o.name))];
  const program = `
import json, sqlite3, sys
ops, names = json.load(sys.stdin)
db = sqlite3.connect(sys.argv[1])
db.execute("CREATE TABLE StringIds (id INTEGER PRIMARY KEY, value TEXT NOT NULL)")
db.execute("CREATE TABLE CUPTI_ACTIVITY_KIND_KERNEL (start INT NOT NULL, end INT NOT NULL, deviceId INT NOT NULL, streamId INT NOT NULL, demangledName INT NOT NULL, shortName INT NOT NULL, gridX INT NOT NULL)")
db.execute("CREATE TABLE CUPTI_ACTIVITY_KIND_MEMCPY (start INT NOT NULL, end INT NOT NULL, deviceId INT NOT NULL, streamId INT NOT NULL, bytes INT NOT NULL, copyKind INT NOT NULL)")
for i, n in enumerate(names):
    db.execute("INSERT INTO StringIds VALUES (?, ?)", (100 + i, n))
    db.execute("INSERT INTO StringIds VALUES (?, ?)", (500 + i, "void freekv::cuda::" + n + "(args)"))
for o in ops:
    if o.get("table") == "memcpy":
        db.execute("INSERT INTO CUPTI_ACTIVITY_KIND_MEMCPY VALUES (?, ?, 0, ?, 4096, 1)", (o["start"], o["end"], o["stream"]))
    else:
        i = names.index(o["name"])
        db.execute("INSERT INTO CUPTI_ACTIVITY_KIND_KERNEL VALUES (?, ?, 0, ?, ?, ?, 1)", (o["start"], o["end"], o["stream"], 500 + i, 100 + i))
db.commit()
`;
  const r = spawnSync(python!, ["-c", program, path], { input: JSON.stringify([ops, names]), encoding: "utf8" });
  expect(r.status, r.stderr).toBe(0);
}

describe.skipIf(!python)(`the Nsight Systems trace reader (seed ${seed})`, () => {
  it("splits runs at a prompt chunk and reports each run's per-step medians as laid out", () => {
    const layers = int(2, 5);
    const runs = [
      { steps: int(3, 5), speculative: true },
      { steps: int(3, 5), speculative: false },
    ];
    const ops: Op[] = [];
    const expected: Expect[][] = [];
    let t = 1_000_000;
    for (const run of runs) {
      // A prompt chunk first: an embedding and a prefill kernel, no decode attention.
      ops.push({ start: t, end: t + 3_000, stream: MAIN, name: "EmbedKernel" });
      ops.push({ start: t + 3_000, end: t + 900_000, stream: MAIN, name: "PrefillFlashSm90Kernel" });
      t += 1_000_000;
      const exps: Expect[] = [];
      for (let s = 0; s < run.steps; s++) {
        const st = decodeStep(t, layers, run.speculative);
        ops.push(...st.ops);
        exps.push(st.exp);
        t = st.end;
      }
      expected.push(exps);
    }
    // Rows in no particular order, as an export need not sort them; a kernel on a third stream
    // with no decode attention must not be taken for the main stream.
    ops.push({ start: 10, end: 20, stream: 99, name: "SelectionScoreKernel" });
    ops.sort(() => rand() - 0.5);
    const trace = join(dir, `trace-${seed}.sqlite`);
    const json = join(dir, `out-${seed}.json`);
    writeTrace(trace, ops);
    const r = spawnSync(python!, [SCRIPT, trace, "--json", json], { encoding: "utf8" });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/run 0: \d+ steps/);
    const res = JSON.parse(readFileSync(json, "utf8")) as {
      main_stream: number;
      runs: Array<Record<string, unknown> & { engine_path: Record<string, number>; busy: Record<string, number>; side: Record<string, number> }>;
    };
    expect(res.main_stream).toBe(MAIN);
    expect(res.runs).toHaveLength(2);
    const median = (xs: number[]) => {
      const s = [...xs].sort((a, b) => a - b);
      return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
    };
    for (let i = 0; i < runs.length; i++) {
      const got = res.runs[i];
      const exps = expected[i];
      expect(got.steps).toBe(runs[i].steps);
      expect(got.layers).toBe(layers);
      expect(got.span).toBe(median(exps.map((e) => e.span)));
      expect(got.engine_path.span).toBe(median(exps.map((e) => e.enginePath)));
      expect(got.engine_path.idle).toBe(median(exps.map((e) => e.engineIdle)));
      expect(got.gather_main).toBe(median(exps.map((e) => e.gatherMain)));
      expect(got.gather_side).toBe(median(exps.map((e) => e.gatherSide)));
      expect(got.gather_both).toBe(median(exps.map((e) => e.both)));
      expect(got.busy.copy).toBeGreaterThan(0);
      expect(got.mode_hint).toMatch(runs[i].speculative ? /speculative/ : /blocking/);
      if (runs[i].speculative) expect(got.side.selection).toBe(3_000 * layers);
      else expect(got.side).toEqual({});
    }
  });
});
