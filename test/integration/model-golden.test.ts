/**
 * The model runner against Hugging Face transformers (test/fixtures/models, made by
 * scripts/goldens/make_goldens.py): logits at recorded prompt positions and continuation steps
 * within 1e-3, the same 40-token greedy continuation with the model's own dense attention and
 * with the FreeKV engine at a budget covering the whole context; with a small budget FreeKV runs
 * end to end and its agreement with dense is reported.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { loadAddon, type Engine, type Model, type Retrieval } from "../../native/binding.js";
import { RETRIEVAL_NAMES } from "../../services/common/retrieval.js";
import { loadModel } from "../../services/compute/model/loader.js";
import { createLocalSession, modelGeometry } from "../../services/compute/model/localHost.js";
import type { Golden } from "../helpers/golden.js";

const FIXTURES = join(import.meta.dirname, "..", "fixtures", "models");


const addon = loadAddon();
const hasEngine = typeof (addon as { Engine?: unknown }).Engine === "function";

function argmax(a: Float32Array, offset: number, n: number): number {
  let best = 0;
  for (let i = 1; i < n; i++) if (a[offset + i] > a[offset + best]) best = i;
  return best;
}

function maxAbsDiff(a: Float32Array, offset: number, b: number[]): number {
  let m = 0;
  for (let i = 0; i < b.length; i++) m = Math.max(m, Math.abs(a[offset + i] - b[i]));
  return m;
}

/** Prompt prefill then greedy decode; returns the tokens and the logits at the recorded steps. */
async function greedy(model: Model, session: number, g: Golden) {
  const V = model.vocabSize;
  const last = await model.prefill(session, Int32Array.from(g.prompt), 0, false);
  let tok = argmax(last, 0, V);
  const tokens = [tok];
  const stepLogits: Float32Array[] = [last];
  let pos = g.prompt.length;
  for (let s = 1; s < g.continuation.length; s++) {
    const l = await model.decode(Int32Array.of(session), Int32Array.of(tok), Int32Array.of(pos++));
    stepLogits.push(l);
    tok = argmax(l, 0, V);
    tokens.push(tok);
  }
  return { tokens, stepLogits };
}

function retrieval(pageSize: number, sink: number, window: number, select: number, mode: Retrieval["mode"]): Retrieval {
  return { pageSize, sinkTokens: sink, windowTokens: window, selectTokens: select, tau: 0.9, summary: RETRIEVAL_NAMES.summary.max_min, combine: RETRIEVAL_NAMES.combine.softmax_mean, mode, recall: RETRIEVAL_NAMES.recall.gather, denseLayers: [] };
}

for (const name of ["tiny-llama3", "tiny-qwen2"]) {
  const dir = join(FIXTURES, name);
  const g = JSON.parse(readFileSync(join(dir, "golden.json"), "utf8")) as Golden;

  describe(`${name} against transformers`, () => {
    it("uses transformers' rotary frequencies", () => {
      const { spec } = loadModel(dir);
      expect(spec.native.ropeInvFreq.length).toBe(g.inv_freq.length);
      spec.native.ropeInvFreq.forEach((x, i) => expect(Math.abs(x - g.inv_freq[i]) / g.inv_freq[i]).toBeLessThan(1e-6));
    });

    it("matches the logits at every recorded prompt position (chunked prefill, all logits)", async () => {
      const { model } = loadModel(dir);
      const V = model.vocabSize;
      // Two chunks of different sizes: the second attends to the first's cache.
      const a = await model.prefill(1, Int32Array.from(g.prompt.slice(0, 137)), 0, true);
      const b = await model.prefill(1, Int32Array.from(g.prompt.slice(137)), 137, true);
      const all = new Float32Array(a.length + b.length);
      all.set(a);
      all.set(b, a.length);
      let worst = 0;
      g.positions.forEach((p, j) => (worst = Math.max(worst, maxAbsDiff(all, p * V, g.logits[j]))));
      console.log(`${name}: max |logit - HF| over ${g.positions.length} prompt positions = ${worst.toExponential(2)}`);
      expect(worst).toBeLessThanOrEqual(1e-3);
    });

    it("matches the greedy continuation and the decode-step logits (dense attention)", async () => {
      const { model } = loadModel(dir);
      const { tokens, stepLogits } = await greedy(model, 7, g);
      let worst = 0;
      g.decode_steps.forEach((s, j) => (worst = Math.max(worst, maxAbsDiff(stepLogits[s], 0, g.decode_logits[j]))));
      console.log(`${name}: max |logit - HF| over ${g.decode_steps.length} decode steps = ${worst.toExponential(2)}`);
      expect(worst).toBeLessThanOrEqual(1e-3);
      expect(tokens).toEqual(g.continuation);
      expect(model.releaseSession(7)).toBe(true);
    });

    describe.skipIf(!hasEngine)("through the FreeKV engine", () => {
      const context = g.prompt.length + g.continuation.length;

      async function run(r: Retrieval) {
        const engine: Engine = new addon.Engine({ backend: "cpu", threads: 2 });
        const { model, spec } = loadModel(dir, { engine });
        const local = createLocalSession(engine, modelGeometry(spec.native), r, context + 16);
        try {
          const out = await greedy(model, local.session, g);
          return { ...out, stats: engine.stats(local.session) };
        } finally {
          await local.close();
        }
      }

      it("engine dense mode gives the same continuation", async () => {
        const { tokens } = await run(retrieval(16, 32, 32, 64, RETRIEVAL_NAMES.mode.dense));
        expect(tokens).toEqual(g.continuation);
      });

      it("FreeKV with a budget covering the context gives the same continuation", async () => {
        const select = Math.ceil(context / 16) * 16;
        const { tokens, stepLogits, stats } = await run(retrieval(16, 32, 32, select, RETRIEVAL_NAMES.mode.freekv));
        expect(tokens).toEqual(g.continuation);
        let worst = 0;
        g.decode_steps.forEach((s, j) => (worst = Math.max(worst, maxAbsDiff(stepLogits[s], 0, g.decode_logits[j]))));
        expect(worst).toBeLessThanOrEqual(1e-3);
        expect(stats.decodeSteps).toBeGreaterThan(0);
      });

      it("FreeKV with a small budget runs end to end and reports its agreement with dense", async () => {
        // page 8: ~40 full pages, of which 4 are selected, plus 2 sink and 2 window pages.
        const { tokens, stepLogits, stats } = await run(retrieval(8, 16, 16, 32, RETRIEVAL_NAMES.mode.freekv));
        expect(tokens).toHaveLength(g.continuation.length);
        let agree = 0;
        for (let i = 0; i < tokens.length && tokens[i] === g.continuation[i]; i++) agree++;
        const same = tokens.filter((t, i) => t === g.continuation[i]).length;
        console.log(
          `${name}: FreeKV small budget (16 sink + 32 selected + 16 window of ${context}): ` +
            `${agree}/${tokens.length} leading tokens agree with dense, ${same}/${tokens.length} positions; ` +
            `selections ${stats.selections}, corrections ${stats.corrections}, pages recalled ${stats.pagesRecalled}`,
        );
        expect(stepLogits.every((l) => l.every(Number.isFinite))).toBe(true);
        expect(stats.selections).toBeGreaterThan(0);
      });
    });
  });
}
