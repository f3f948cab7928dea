/**
 * Generation pieces without the native model: sampling (greedy, temperature, top-k, top-p,
 * seeds) against the exact distributions, stop tokens and stop strings across token boundaries,
 * and the decode scheduler's batching and its isolation of a failing request.
 */
import { describe, expect, it } from "vitest";
import type { Model } from "../../native/binding.js";
import { Sampler, addonFn, argmax, sampleJs } from "../../services/compute/generate/sampling.js";
import { ModelScheduler } from "../../services/compute/generate/scheduler.js";
import { StopMatcher } from "../../services/compute/generate/stop.js";
import { prng, randomF32 } from "../helpers/prng.js";

function histogram(s: Sampler, logits: Float32Array, n: number): number[] {
  const h = new Array<number>(logits.length).fill(0);
  for (let i = 0; i < n; i++) h[s.sample(logits, 0, logits.length)]++;
  return h.map((c) => c / n);
}

/** Exact probabilities in float64: softmax(l / T) over the kept ids, renormalised. */
function exact(logits: Float32Array, t: number, keep: number[]): number[] {
  const p = new Array<number>(logits.length).fill(0);
  const m = Math.max(...keep.map((i) => logits[i]));
  let z = 0;
  for (const i of keep) z += Math.exp((logits[i] - m) / t);
  for (const i of keep) p[i] = Math.exp((logits[i] - m) / t) / z;
  return p;
}

describe("sampling", () => {
  const logits = randomF32(12, prng(5), 1.5);
  const order = Array.from(logits.keys()).sort((a, b) => logits[b] - logits[a]);

  it("temperature 0 is the argmax", () => {
    const s = new Sampler({ temperature: 0, topP: 0.5, topK: 3, seed: 1 });
    expect(s.sample(logits, 0, 12)).toBe(order[0]);
    expect(argmax(logits)).toBe(order[0]);
  });

  it("temperature alone follows softmax(logits / T)", () => {
    const got = histogram(new Sampler({ temperature: 0.7, topP: 0, topK: 0, seed: 42 }), logits, 40000);
    const want = exact(logits, 0.7, order);
    want.forEach((p, i) => expect(Math.abs(got[i] - p)).toBeLessThan(0.012));
  });

  it("top-k keeps the k most likely tokens, renormalised", () => {
    const got = histogram(new Sampler({ temperature: 1.3, topP: 0, topK: 3, seed: 7 }), logits, 40000);
    const want = exact(logits, 1.3, order.slice(0, 3));
    want.forEach((p, i) => expect(Math.abs(got[i] - p)).toBeLessThan(0.012));
  });

  it("top-p keeps the smallest most-likely set reaching p", () => {
    const l = Float32Array.from([Math.log(0.5), Math.log(0.3), Math.log(0.15), Math.log(0.05)]);
    const got = histogram(new Sampler({ temperature: 1, topP: 0.7, topK: 0, seed: 9 }), l, 30000);
    expect(got[2] + got[3]).toBe(0);
    expect(Math.abs(got[0] - 0.5 / 0.8)).toBeLessThan(0.015);
    const got2 = histogram(new Sampler({ temperature: 1, topP: 0.85, topK: 0, seed: 9 }), l, 30000);
    expect(got2[3]).toBe(0);
    expect(Math.abs(got2[2] - 0.15 / 0.95)).toBeLessThan(0.015);
  });

  it("a seed reproduces the draws; another seed gives others", () => {
    const draw = (seed: number) => {
      const s = new Sampler({ temperature: 1, topP: 0, topK: 0, seed });
      return Array.from({ length: 50 }, () => s.sample(logits, 0, 12));
    };
    expect(draw(123)).toEqual(draw(123));
    expect(draw(123)).not.toEqual(draw(124));
  });

  it("the addon's draw over a real vocabulary is the reference's, token for token", async () => {
    const f = addonFn("sampleF32");
    expect(f).not.toBeNull();
    const seed = (Date.now() ^ (process.pid << 8)) >>> 0;
    const r = prng(seed);
    let same = 0;
    for (let c = 0; c < 60; c++) {
      const vocab = 4096 + Math.floor(r() * 60000);
      // Flat rows (every token a candidate, as a random model's are) and peaked ones; ties too.
      const scale = [0.05, 1, 4, 12][c % 4];
      const row = randomF32(vocab + 7, r, scale);
      if (c % 5 === 0) for (let i = 0; i < 200; i++) row[3 + Math.floor(r() * vocab)] = row[3];
      const opts = { temperature: 0.2 + r() * 1.8, topK: c % 3 === 0 ? 0 : 1 + Math.floor(r() * 300), topP: [0, 1, 0.5 + r() * 0.45, 0.99][c % 4], seed: 0 };
      for (let d = 0; d < 20; d++) {
        const u = r();
        const want = sampleJs(row, 3, vocab, opts, u);
        const got = f!(row, 3, vocab, opts.temperature, opts.topK, opts.topP, u);
        expect(got, `seed ${seed} case ${c} draw ${d} (${JSON.stringify({ vocab, ...opts, u })})`).toBe(want);
        same++;
      }
    }
    expect(same).toBe(1200);
    // NaN logits are never drawn, by either; a row of NaNs is refused by both, also batched.
    const holes = randomF32(6000, r, 2);
    for (let i = 0; i < 3000; i++) holes[Math.floor(r() * 6000)] = NaN;
    for (let d = 0; d < 50; d++) {
      const u = r();
      const want = sampleJs(holes, 0, 6000, { temperature: 1, topK: 0, topP: d % 2 ? 0.9 : 0, seed: 0 }, u);
      expect(Number.isNaN(holes[want])).toBe(false);
      expect(f!(holes, 0, 6000, 1, 0, d % 2 ? 0.9 : 0, u)).toBe(want);
    }
    const nan = new Float32Array(5000).fill(NaN);
    expect(() => sampleJs(nan, 0, 5000, { temperature: 1, topK: 0, topP: 0, seed: 0 }, 0.5)).toThrow(/every logit of the row is NaN/);
    expect(() => f!(nan, 0, 5000, 1, 0, 0, 0.5)).toThrow(/every logit of the row is NaN/);
    const rows = addonFn("sampleRowsAsync")!;
    const two = new Float32Array(10000);
    two.set(randomF32(5000, r, 1), 0);
    two.fill(NaN, 5000);
    await expect(rows(two, 5000, Int32Array.from([0, 1]), Float64Array.from([1, 0, 0, 0.5, 1, 0, 0, 0.5]))).rejects.toThrow(/rows\[1\]/);
    // Checked arguments.
    const row = randomF32(5000, r, 1);
    expect(() => f!(row, 0, 5001, 1, 0, 0, 0.5)).toThrow(RangeError);
    expect(() => f!(row, 0, 5000, 0, 0, 0, 0.5)).toThrow(/temperature/);
    expect(() => f!(row, 0, 5000, 1, 0, 1.5, 0.5)).toThrow(/topP/);
    expect(() => f!(row, 0, 5000, 1, 0, 0, 1)).toThrow(/u must be/);
  });
});

describe("stop conditions", () => {
  // A toy vocabulary: id -> piece.
  const pieces = ["he", "llo", " wo", "rld", "!", "<eos>", " S", "TOP", "ST", "OP", "x"];
  const decode = (ids: number[]) => ids.map((i) => pieces[i]).join("");

  function run(ids: number[], stopTokens: number[], stopStrings: string[]) {
    const m = new StopMatcher(new Set(stopTokens), stopStrings, decode);
    let text = "";
    const seq: number[] = [];
    for (const id of ids) {
      seq.push(id);
      const r = m.push(seq);
      text += r.text;
      if (r.stop) return { text, stop: r.stop, at: seq.length };
    }
    return { text: text + m.flush(seq), stop: undefined, at: seq.length };
  }

  it("a stop token ends generation and is not part of the text", () => {
    expect(run([0, 1, 5, 2], [5], [])).toEqual({ text: "hello", stop: "stop_token", at: 3 });
  });

  it("a stop string spanning tokens ends generation; nothing of it is streamed", () => {
    expect(run([0, 1, 6, 7, 2], [], ["STOP"])).toEqual({ text: "hello ", stop: "stop_string", at: 4 });
    expect(run([0, 8, 9, 2], [], ["STOP"])).toEqual({ text: "he", stop: "stop_string", at: 3 });
  });

  it("a long run of tokens that decode to nothing is not decoded again at every step", () => {
    let decoded = 0;
    const m = new StopMatcher(new Set(), ["STOP"], (ids) => {
      decoded += ids.length;
      return ids.map((i) => (i === 99 ? "" : pieces[i])).join("");
    });
    const seq = [0];
    let text = m.push(seq).text;
    const n = 3000;
    for (let i = 0; i < n; i++) text += m.push([...seq, ...Array<number>(i + 1).fill(99)]).text;
    seq.push(...Array<number>(n).fill(99), 1, 2);
    text += m.push(seq.slice(0, -1)).text + m.push(seq).text + m.flush(seq);
    expect(text).toBe(decode([0, 1, 2]));
    // Linear in the run (a few context tokens a step), not quadratic (n^2 / 2 = 4.5M ids).
    expect(decoded).toBeLessThan(20 * n);
  });

  it("a tail that could start a stop string is held back, then released when it does not", () => {
    const m = new StopMatcher(new Set(), ["STOP"], decode);
    expect(m.push([0, 8]).text).toBe("he"); // "ST" held back
    expect(m.push([0, 8, 10]).text).toBe("STx");
  });

  it("incremental text equals a full decode, also across multi-token UTF-8 characters", async () => {
    const { execFileSync } = await import("node:child_process");
    const { mkdtempSync, rmSync } = await import("node:fs");
    const { tmpdir } = await import("node:os");
    const { join } = await import("node:path");
    const { loadTextCodec } = await import("../../services/compute/model/tokenizer.js");
    const dir = mkdtempSync(join(tmpdir(), "freekv-tok-"));
    try {
      execFileSync(process.execPath, [join(import.meta.dirname, "..", "..", "scripts", "make-builtin-model.mjs"), "--out", dir]);
      const codec = loadTextCodec(dir)!;
      const text = "Grüße aus Köln — 東京 ✓ pages, sink & window: 1024 tokens 🙂 done";
      const ids = codec.encode(text);
      const m = new StopMatcher(new Set(), [], (x) => codec.decode(x));
      let streamed = "";
      for (let i = 1; i <= ids.length; i++) {
        const r = m.push(ids.slice(0, i));
        expect(r.text).not.toContain("\uFFFD");
        streamed += r.text;
      }
      streamed += m.flush(ids);
      expect(streamed).toBe(text);
      // random ids (not valid UTF-8 in general): the stream still equals the full decode
      const r = prng(3);
      const junk = Array.from({ length: 300 }, () => Math.floor(r() * 500));
      const m2 = new StopMatcher(new Set(), [], (x) => codec.decode(x));
      let s2 = "";
      for (let i = 1; i <= junk.length; i++) s2 += m2.push(junk.slice(0, i)).text;
      s2 += m2.flush(junk);
      expect(s2).toBe(codec.decode(junk));
      // a stop token as the very first token: no text, no error
      expect(new StopMatcher(new Set([ids[0]]), [], (x) => codec.decode(x)).push([ids[0]])).toEqual({ text: "", stop: "stop_token" });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("without a tokenizer only stop tokens apply", () => {
    const m = new StopMatcher(new Set([3]), ["llo"], undefined);
    expect(m.push([0, 1])).toEqual({ text: "", stop: undefined });
    expect(m.push([0, 1, 3]).stop).toBe("stop_token");
  });
});

describe("decode scheduler", () => {
  /** A stand-in Model: records each decode call's sessions; logits row = [session, token, position]. */
  function fakeModel(failOn?: number) {
    const calls: number[][] = [];
    const greedyCalls: number[][] = [];
    const model = {
      vocabSize: 3,
      attention: "dense",
      releaseSession: () => false,
      prefill: async () => new Float32Array(3),
      decode: async (s: Int32Array, t: Int32Array, p: Int32Array) => {
        calls.push(Array.from(s));
        await new Promise((r) => setTimeout(r, 5));
        // As the binding marks an input check's error (nothing was appended).
        if (failOn !== undefined && s.includes(failOn)) throw Object.assign(new Error(`session ${failOn} is bad`), { refused: true });
        const out = new Float32Array(3 * s.length);
        s.forEach((x, i) => out.set([x, t[i], p[i]], 3 * i));
        return out;
      },
      decodeArgmax: async (s: Int32Array, t: Int32Array) => {
        calls.push(Array.from(s));
        greedyCalls.push(Array.from(s));
        await new Promise((r) => setTimeout(r, 5));
        return Int32Array.from(s, (x, i) => 1000 * x + t[i]);
      },
    } as unknown as Model;
    return { model, calls, greedyCalls };
  }

  it("joins the steps of concurrent requests into one call and routes each row back", async () => {
    const { model, calls } = fakeModel();
    const sch = new ModelScheduler(model);
    const sizes: number[] = [];
    const loop = async (session: number) => {
      const seen: number[][] = [];
      for (let step = 0; step < 5; step++) {
        const r = await sch.step(session, 100 + step, 10 * session + step);
        seen.push(Array.from(r.logits));
        sizes.push(r.batchSize);
      }
      return seen;
    };
    const out = await Promise.all([loop(1), loop(2), loop(3)]);
    out.forEach((rows, i) => rows.forEach((row, step) => expect(row).toEqual([i + 1, 100 + step, 10 * (i + 1) + step])));
    expect(calls.length).toBe(5);
    expect(calls.every((c) => c.length === 3)).toBe(true);
    expect(sizes).toEqual(new Array(15).fill(3));
    expect(sch.batches).toBe(5);
  });

  it("never puts one session twice in a batch and caps the batch size", async () => {
    const { model, calls } = fakeModel();
    const sch = new ModelScheduler(model, { maxBatch: 2 });
    await Promise.all([sch.step(1, 0, 0), sch.step(1, 0, 1), sch.step(2, 0, 0), sch.step(3, 0, 0)]);
    for (const c of calls) {
      expect(c.length).toBeLessThanOrEqual(2);
      expect(new Set(c).size).toBe(c.length);
    }
  });

  it("starts the next batch as soon as every request of the last one has asked for its next step", async () => {
    const { model, calls } = fakeModel();
    const sch = new ModelScheduler(model);
    await Promise.all([sch.step(1, 0, 0), sch.step(2, 0, 0)]);
    expect(calls).toEqual([[1, 2]]);
    const a = sch.step(1, 1, 1);
    expect(calls.length).toBe(1); // session 2 is not back yet: wait
    const b = sch.step(2, 1, 1);
    expect(calls).toEqual([[1, 2], [1, 2]]); // started at once, not after setImmediate
    await Promise.all([a, b]);
    // A request that ends does not hold the others back: they run after setImmediate as before.
    await sch.step(1, 2, 2);
    expect(calls).toEqual([[1, 2], [1, 2], [1]]);
  });

  it("rows at temperature > 0 are drawn for the whole batch, each the token its own draw picks from its row", async () => {
    // A vocabulary of 6000 with random logits per call: each row's token must be sampleJs of that row.
    const V = 6000;
    const r = prng((Date.now() ^ 0x5a5a) >>> 0);
    const returned: Float32Array[] = [];
    const model = {
      vocabSize: V,
      attention: "dense",
      releaseSession: () => false,
      prefill: async () => new Float32Array(V),
      decode: async (s: Int32Array) => {
        const out = randomF32(V * s.length, r, 3);
        returned.push(out);
        return out;
      },
      decodeArgmax: async () => {
        throw new Error("not all rows are greedy");
      },
    } as unknown as Model;
    const sch = new ModelScheduler(model);
    const draws = [1, 2, 3, 4].map((i) => ({ temperature: 0.5 + i / 4, topK: i % 2 ? 0 : 40 * i, topP: i === 3 ? 0.9 : 0, u: r() }));
    const results = await Promise.all([
      sch.step(1, 0, 0, false, draws[0]),
      sch.step(2, 0, 0, false, draws[1]),
      sch.step(3, 0, 0, true), // greedy in a mixed batch: logits, no token
      sch.step(4, 0, 0, false, draws[2]),
      sch.step(5, 0, 0, false, draws[3]),
    ]);
    expect(returned.length).toBe(1);
    const rowOf = [0, 1, 2, 3, 4];
    [0, 1, 3, 4].forEach((k, j) => {
      const want = sampleJs(returned[0], rowOf[k] * V, V, { ...draws[j], seed: 0 }, draws[j].u);
      expect(results[k].token).toBe(want);
    });
    expect(results[2].token).toBeUndefined();
    expect(results[2].logits.length).toBe(V);
  });

  it("an all-greedy batch runs through decodeArgmax; a mixed batch gets logits for every row", async () => {
    const { model, calls, greedyCalls } = fakeModel();
    const sch = new ModelScheduler(model);
    const greedy = await Promise.all([sch.step(1, 5, 0, true), sch.step(2, 6, 0, true)]);
    expect(greedyCalls).toEqual([[1, 2]]);
    expect(greedy.map((r) => r.token)).toEqual([1005, 2006]);
    expect(greedy.every((r) => r.logits.length === 0)).toBe(true);
    const mixed = await Promise.all([sch.step(1, 7, 1, true), sch.step(3, 8, 0, false)]);
    expect(greedyCalls.length).toBe(1);
    expect(calls.length).toBe(2);
    expect(mixed.map((r) => r.token)).toEqual([undefined, undefined]);
    expect(Array.from(mixed[0].logits)).toEqual([1, 7, 1]);
    expect(Array.from(mixed[1].logits)).toEqual([3, 8, 0]);
  });

  it("a request the model refuses by its checks does not fail the others of its batch", async () => {
    const { model } = fakeModel(99);
    const sch = new ModelScheduler(model);
    const [a, bad, b] = await Promise.allSettled([sch.step(1, 5, 0), sch.step(99, 5, 0), sch.step(2, 6, 0)]);
    expect(a.status).toBe("fulfilled");
    expect(b.status).toBe("fulfilled");
    expect(bad.status).toBe("rejected");
    expect((bad as PromiseRejectedResult).reason.message).toMatch(/session 99/);
  });
});
