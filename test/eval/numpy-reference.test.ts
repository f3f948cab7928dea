/**
 * The trained model's greedy output against an independent implementation of its forward:
 * tools/study/query_predictors.py runs models/retrieval-8m in float32 NumPy, written from the Llama
 * architecture alone (no code shared with the native model runner). Both generate greedily from the
 * same token ids (encodePrompt, as `freekv eval` sends them) over 2K-token needle prompts; the
 * service runs dense attention on the CPU backend through `freekv eval`. The texts must agree (one
 * task of four may part at a near tie: float32 sums in another order). Skipped, saying so, when
 * python3 has no NumPy.
 */
import { execFile, spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, describe, expect, it } from "vitest";
import { loadTextCodec } from "../../services/compute/model/tokenizer.js";
import { encodePrompt } from "../../tools/eval/run.js";
import { parseTasks } from "../../tools/eval/tasks.js";

const execFileP = promisify(execFile);
const ROOT = join(import.meta.dirname, "..", "..");
const TSX = join(ROOT, "node_modules", ".bin", "tsx");
const MAIN = join(ROOT, "tools", "cli", "main.ts");
const MODEL = join(ROOT, "models", "retrieval-8m");
const python = ["/usr/bin/python3", "python3"].find((p) => spawnSync(p, ["-c", "import numpy"], { stdio: "ignore" }).status === 0);
if (!python) console.warn("numpy-reference test skipped: no python3 with NumPy (apt-get install python3-numpy)");
const dir = mkdtempSync(join(tmpdir(), "freekv-numpy-ref-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe.skipIf(!python)("the trained model against a NumPy implementation of its forward", () => {
  it("greedy texts agree with the service's dense generations", { timeout: 240_000 }, async () => {
    const lines = readFileSync(join(ROOT, "test", "fixtures", "tasks", "needle-2k.jsonl"), "utf8").split("\n").filter((l) => l.trim());
    const tasksFile = join(dir, "tasks.jsonl");
    writeFileSync(tasksFile, lines.slice(0, 4).join("\n") + "\n");
    const tasks = parseTasks(readFileSync(tasksFile, "utf8"));
    const codec = loadTextCodec(MODEL)!;
    const idsFile = join(dir, "ids.jsonl");
    writeFileSync(idsFile, tasks.map((t) => JSON.stringify({ id: t.id, family: t.family, max_tokens: t.max_tokens, ids: encodePrompt(codec, t) })).join("\n") + "\n");

    const evalJson = join(dir, "eval.json");
    await execFileP(TSX, [MAIN, "eval", "--model", MODEL, "--tasks", tasksFile, "--modes", "dense", "--threads", "2", "--json", evalJson],
      { cwd: ROOT, maxBuffer: 64 << 20 });
    const study = join(dir, "study.json");
    await execFileP(python!, [join(ROOT, "tools", "study", "query_predictors.py"), "--model", MODEL, "--ids", idsFile, "--out", study,
      "--sink", "128", "--window", "128", "--select", "256", "--page", "16"], { cwd: ROOT, maxBuffer: 64 << 20 });

    const service = new Map<string, string>();
    for (const r of JSON.parse(readFileSync(evalJson, "utf8")).results as { id: string; text: string }[]) service.set(r.id, r.text);
    const ours = JSON.parse(readFileSync(study, "utf8")) as {
      generated: { id: string; ids: number[] }[];
      layers: Record<string, { adjacent_cosine: number; prev: { topk_overlap: number | null; samples: number } }>;
    };
    expect(ours.generated.length).toBe(4);
    let same = 0;
    for (const g of ours.generated) {
      const text = codec.decode(g.ids, true);
      expect(service.has(g.id)).toBe(true);
      if (text === service.get(g.id)) same += 1;
      else console.warn(`numpy-reference: ${g.id}: numpy ${JSON.stringify(text)}, service ${JSON.stringify(service.get(g.id))}`);
    }
    expect(same, "greedy texts identical").toBeGreaterThanOrEqual(3);
    // The predictor figures come from real decode steps: every layer has samples, cosines in (0, 1].
    for (const l of Object.values(ours.layers)) {
      expect(l.prev.samples).toBeGreaterThan(0);
      expect(l.adjacent_cosine).toBeGreaterThan(0);
      expect(l.adjacent_cosine).toBeLessThanOrEqual(1);
      expect(l.prev.topk_overlap!).toBeGreaterThan(0);
    }
  });
});
