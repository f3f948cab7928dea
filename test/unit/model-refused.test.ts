/**
 * A Model call's input checks, before anything is appended, through the binding the services use:
 * their errors are marked `refused` (the call may run again, the sessions are as they were), and a
 * session made for another model's shapes is refused before the runner's buffers (sized by the
 * model) meet the engine's reads and writes (sized by the session). An error after the checks is
 * not marked. The engine's background failures start empty.
 */
import { afterAll, describe, expect, it } from "vitest";
import { loadAddon, type Engine } from "../../native/binding.js";
import { loadModel } from "../../services/compute/model/loader.js";
import { createLocalSession, modelGeometry, type LocalSession } from "../../services/compute/model/localHost.js";
import { prng } from "../helpers/prng.js";
import { SMALL_RETRIEVAL, TINY_LLAMA } from "../helpers/tiny-model.js";

const seed = (Date.now() ^ (process.pid << 5)) >>> 0;
const rand = prng(seed);
const MODEL = TINY_LLAMA;
const RETRIEVAL = SMALL_RETRIEVAL;

const engine: Engine = new (loadAddon().Engine)({ backend: "cpu", threads: 2 });
const { model, spec } = loadModel(MODEL, { engine });
const opened: LocalSession[] = [];
afterAll(async () => {
  for (const s of opened) await s.close();
});

const tokens = (n: number) => Int32Array.from({ length: n }, () => 1 + Math.floor(rand() * (model.vocabSize - 1)));
const caught = (p: Promise<unknown>) =>
  p.then(
    () => undefined,
    (e: unknown) => e as Error & { refused?: boolean },
  );

describe(`Model calls refused by their checks (seed ${seed})`, () => {
  it("marks input-check errors refused, and the session is unchanged after them", async () => {
    const s = createLocalSession(engine, modelGeometry(spec.native), RETRIEVAL, 256);
    opened.push(s);
    const n = 5 + Math.floor(rand() * 20);
    await model.prefill(s.session, tokens(n), 0, false);
    const cases: Array<[string, () => Promise<unknown>, RegExp]> = [
      ["a prefill at another position", () => model.prefill(s.session, tokens(3), n + 1, false), /startPosition .* does not match/],
      ["a decode at another position", () => model.decodeArgmax(Int32Array.of(s.session), Int32Array.of(1), Int32Array.of(n - 1)), /positions\[0\]/],
      ["a token out of range", () => model.decode(Int32Array.of(s.session), Int32Array.of(model.vocabSize), Int32Array.of(n)), /out of range/],
      ["a session twice in one step", () => model.decodeArgmax(Int32Array.of(s.session, s.session), Int32Array.of(1, 2), Int32Array.of(n, n)), /appears twice/],
    ];
    for (const [what, call, message] of cases) {
      const e = await caught(call());
      expect(e, what).toBeInstanceOf(Error);
      expect(e?.message, what).toMatch(message);
      expect(e?.refused, what).toBe(true);
      expect(engine.contextTokens(s.session), what).toBe(n);
    }
    // Nothing was appended: the next token goes where it belongs.
    const next = await model.decodeArgmax(Int32Array.of(s.session), Int32Array.of(1), Int32Array.of(n));
    expect(next).toHaveLength(1);
    expect(engine.contextTokens(s.session)).toBe(n + 1);
  });

  it("refuses a session made for another model's shapes, before any layer runs", async () => {
    const g = modelGeometry(spec.native);
    const others = [
      { ...g, qHeads: g.qHeads / 2, kvHeads: g.kvHeads / 2 },
      { ...g, headDim: g.headDim / 2 },
      { ...g, layers: g.layers + 1 },
    ];
    const fine = createLocalSession(engine, g, RETRIEVAL, 256);
    opened.push(fine);
    await model.prefill(fine.session, tokens(9), 0, false);
    for (const other of others) {
      const s = createLocalSession(engine, other, RETRIEVAL, 256);
      opened.push(s);
      const what = JSON.stringify(other);
      for (const call of [() => model.prefill(s.session, tokens(4), 0, false), () => model.decode(Int32Array.of(s.session), Int32Array.of(1), Int32Array.of(0))]) {
        const e = await caught(call());
        expect(e?.message, what).toMatch(/was made for another model/);
        expect(e?.refused, what).toBe(true);
        expect(engine.contextTokens(s.session), what).toBe(0);
      }
      // In a batch with a session of the model's shapes: the whole step is refused, nothing appended.
      const e = await caught(model.decodeArgmax(Int32Array.of(fine.session, s.session), Int32Array.of(1, 1), Int32Array.of(9, 0)));
      expect(e?.refused, what).toBe(true);
      expect(engine.contextTokens(fine.session), what).toBe(9);
    }
  });

  it("has no background failures to report on a healthy engine", () => {
    expect(engine.takeBackgroundFailures()).toEqual({ failures: [], dropped: 0 });
  });
});
