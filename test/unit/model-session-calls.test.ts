/**
 * The calls on one session of a Model run one at a time, through the binding the services use:
 * a call naming a session whose call is in flight throws at once and claims none of its sessions,
 * calls on other sessions run meanwhile, and the session takes calls again once its call settled
 * (its context then exactly as after that call). The same for a Model without an engine (its own
 * dense cache), whose releaseSession is refused while the session's call runs.
 */
import { afterAll, describe, expect, it } from "vitest";
import { loadAddon, type Engine } from "../../native/binding.js";
import { loadModel } from "../../services/compute/model/loader.js";
import { createLocalSession, modelGeometry, type LocalSession } from "../../services/compute/model/localHost.js";
import { prng } from "../helpers/prng.js";
import { SMALL_RETRIEVAL, TINY_LLAMA } from "../helpers/tiny-model.js";

const seed = (Date.now() ^ (process.pid << 7)) >>> 0;
const rand = prng(seed);
const MODEL = TINY_LLAMA;
const RETRIEVAL = SMALL_RETRIEVAL;

const engine: Engine = new (loadAddon().Engine)({ backend: "cpu", threads: 2 });
const withEngine = loadModel(MODEL, { engine });
const dense = loadModel(MODEL, { threads: 2 });
const opened: LocalSession[] = [];
afterAll(async () => {
  for (const s of opened) await s.close();
});

const tokens = (n: number, vocab: number) => Int32Array.from({ length: n }, () => 1 + Math.floor(rand() * (vocab - 1)));

describe(`calls on one session of a Model (seed ${seed})`, () => {
  it("with an engine: a second call on a busy session throws at once and claims nothing; the others run; then it continues exactly", async () => {
    const { model, spec } = withEngine;
    const V = model.vocabSize;
    const [a, b] = [0, 1].map(() => {
      const s = createLocalSession(engine, modelGeometry(spec.native), RETRIEVAL, 512);
      opened.push(s);
      return s.session;
    });
    const n = 40 + Math.floor(rand() * 40);
    const promptA = tokens(n, V), promptB = tokens(n, V), next = 1 + Math.floor(rand() * (V - 1));
    const first = model.prefill(a, promptA, 0, false);
    expect(() => model.prefill(a, tokens(3, V), n, false)).toThrow(/session \d+ has a model call in flight/);
    expect(() => model.decodeArgmax(Int32Array.of(a), Int32Array.of(next), Int32Array.of(n))).toThrow(/in flight/);
    // A batch naming the busy session claims none of its sessions: b takes a call right after.
    expect(() => model.decode(Int32Array.of(b, a), Int32Array.of(next, next), Int32Array.of(0, n))).toThrow(new RegExp(`session ${a} has a model call in flight`));
    const other = model.prefill(b, promptB, 0, false);
    await Promise.all([first, other]);
    // Settled: a continues from exactly the context of its one prefill, as b does (same next token, same logits as a fresh session fed the same).
    const [la, lb] = await Promise.all([
      model.decode(Int32Array.of(a), Int32Array.of(next), Int32Array.of(n)),
      model.decode(Int32Array.of(b), Int32Array.of(next), Int32Array.of(n)),
    ]);
    const ref = createLocalSession(engine, modelGeometry(spec.native), RETRIEVAL, 512);
    opened.push(ref);
    await model.prefill(ref.session, promptA, 0, false);
    const lr = await model.decode(Int32Array.of(ref.session), Int32Array.of(next), Int32Array.of(n));
    expect(Array.from(la)).toEqual(Array.from(lr));
    expect(lb.length).toBe(la.length);
  });

  it("without an engine (dense cache): the same, and releaseSession is refused until the call settled", async () => {
    const { model } = dense;
    expect(model.attention).toBe("dense");
    const V = model.vocabSize;
    const a = 100 + Math.floor(rand() * 1000), b = a + 1, ref = a + 2;
    const n = 30 + Math.floor(rand() * 30);
    const promptA = tokens(n, V), next = 1 + Math.floor(rand() * (V - 1));
    const first = model.prefill(a, promptA, 0, false);
    expect(() => model.prefill(a, tokens(2, V), n, false)).toThrow(/in flight/);
    expect(() => model.releaseSession(a)).toThrow(/in flight/);
    const other = model.prefill(b, tokens(n, V), 0, false);
    await Promise.all([first, other]);
    const la = await model.decode(Int32Array.of(a), Int32Array.of(next), Int32Array.of(n));
    await model.prefill(ref, promptA, 0, false);
    const lr = await model.decode(Int32Array.of(ref), Int32Array.of(next), Int32Array.of(n));
    expect(Array.from(la)).toEqual(Array.from(lr));
    for (const s of [a, b, ref]) expect(model.releaseSession(s)).toBe(true);
    expect(model.releaseSession(a)).toBe(false);
  });
});
