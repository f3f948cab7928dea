/**
 * Hierarchical page selection (native/src/engine/Hierarchy.h): groups of 32 page summaries with
 * their own bounds and a branch-and-bound top-k over them. With the mean and max combines (and
 * softmax_mean with one query head per KV head) the attended pages must be exactly those of the
 * flat scan: against the float64 policy reference (tools/reference/policy.ts, whose top-k is
 * tools/reference/selection.ts) and against the same engine with hierarchicalSelection "off",
 * step by step, on random and adversarial keys (ties, all pages equal, one group dominating),
 * candidate ranges that cut groups, page counts that are not a multiple of the group size, both
 * summary kinds and several GQA ratios.
 */
import { describe, expect, it } from "vitest";
import { loadAddon, type Engine } from "../../native/binding.js";
import { ReferenceLayer, type ModeName, type PolicyConfig } from "../../tools/reference/policy.js";
import type { CombineName } from "../../tools/reference/selection.js";
import type { SummaryKindName } from "../../tools/reference/summary.js";
import { Prng, testSeed } from "./reference/prng.js";
import { openSession } from "./reference/harness.js";

const seed = testSeed();

type KeyKind = "random" | "ties" | "equal" | "dominant" | "blocks";
interface Case {
  qHeads: number;
  kvHeads: number;
  summary: SummaryKindName;
  combine: CombineName;
  keys: KeyKind;
  mode: ModeName;
}

const D = 16;
const P = 4;

/** Keys ([n][Hkv][D]) for token positions start..start+n. */
function keysFor(kind: KeyKind, rng: Prng, start: number, n: number, kvn: number): Float32Array {
  const a = new Float32Array(n * kvn);
  for (let t = 0; t < n; t++)
    for (let i = 0; i < kvn; i++) {
      const pos = start + t;
      let x: number;
      if (kind === "equal") x = ((i * 7) % 5) / 4 - 0.5;
      else if (kind === "blocks") {
        // Every page of a group alike (its score is its group's bound): the fourth group (pages
        // 96..127) at level 2 but for one page at 3, the second group (32..63) at level 2, the
        // rest at 1. The fourth group is visited first and fills the top-k with level-2 pages;
        // the second group's bound equals that k-th score, and its pages win the tie (lower pages).
        const page = Math.floor(pos / P);
        const level = page >= 96 && page < 128 ? (page === 101 ? 3 : 2) : page >= 32 && page < 64 ? 2 : 1;
        x = level * (1 + (i % 3));
      }
      else if (kind === "ties") x = Math.round(rng.normal()) / 2; // few distinct values: many equal summaries
      else if (kind === "dominant") {
        // pages 64..95 (the third group) carry large keys, the rest small ones
        const page = Math.floor(pos / P);
        x = Math.round(rng.normal() * (page >= 64 && page < 96 ? 16 : 2)) / 4;
      } else x = Math.round(rng.normal() * 4) / 4;
      a[t * kvn + i] = x;
    }
  return a;
}

function values(rng: Prng, n: number): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = Math.round(rng.normal() * 4) / 4;
  return a;
}

function query(kind: KeyKind, rng: Prng, n: number): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++)
    a[i] = kind === "ties" ? Math.round(rng.normal()) : kind === "blocks" ? Math.abs(Math.round(rng.normal() * 4) / 4) : Math.round(rng.normal() * 4) / 4;
  return a;
}

const cases: Case[] = [
  { qHeads: 4, kvHeads: 4, summary: "maxmin", combine: "mean", keys: "random", mode: "oracle" },
  { qHeads: 4, kvHeads: 2, summary: "maxmin", combine: "mean", keys: "random", mode: "freekv" },
  { qHeads: 8, kvHeads: 2, summary: "cuboid", combine: "max", keys: "random", mode: "oracle" },
  { qHeads: 8, kvHeads: 1, summary: "maxmin", combine: "max", keys: "dominant", mode: "oracle" },
  { qHeads: 4, kvHeads: 2, summary: "cuboid", combine: "mean", keys: "dominant", mode: "speculative" },
  { qHeads: 4, kvHeads: 2, summary: "maxmin", combine: "mean", keys: "ties", mode: "oracle" },
  { qHeads: 2, kvHeads: 2, summary: "maxmin", combine: "max", keys: "ties", mode: "freekv" },
  { qHeads: 4, kvHeads: 1, summary: "cuboid", combine: "max", keys: "equal", mode: "oracle" },
  { qHeads: 2, kvHeads: 1, summary: "maxmin", combine: "mean", keys: "equal", mode: "freekv" },
  { qHeads: 2, kvHeads: 2, summary: "maxmin", combine: "softmax_mean", keys: "random", mode: "oracle" },
  { qHeads: 4, kvHeads: 4, summary: "cuboid", combine: "softmax_mean", keys: "dominant", mode: "freekv" },
  { qHeads: 2, kvHeads: 2, summary: "maxmin", combine: "softmax_mean", keys: "ties", mode: "oracle" },
  { qHeads: 4, kvHeads: 2, summary: "maxmin", combine: "mean", keys: "blocks", mode: "oracle" },
  { qHeads: 8, kvHeads: 1, summary: "cuboid", combine: "max", keys: "blocks", mode: "oracle" },
  { qHeads: 1, kvHeads: 1, summary: "maxmin", combine: "softmax_mean", keys: "blocks", mode: "oracle" },
];

describe(`hierarchical selection equals the flat top-k (seed ${seed})`, () => {
  for (const [ci, c0] of cases.entries())
    it(`${c0.mode} Hq=${c0.qHeads} Hkv=${c0.kvHeads} ${c0.summary} ${c0.combine} ${c0.keys} keys`, async () => {
      const rng = new Prng(seed + 977 * ci);
      // Sink 3 pages and window 5 pages: the candidate range starts and ends inside a group;
      // select 8 pages.
      const c: PolicyConfig = {
        qHeads: c0.qHeads,
        kvHeads: c0.kvHeads,
        headDim: D,
        pageSize: P,
        summary: c0.summary,
        combine: c0.combine,
        sinkTokens: 3 * P,
        windowTokens: 5 * P,
        selectTokens: 8 * P,
        tau: 0.9,
        mode: c0.mode,
        dtype: "f32",
      };
      const addon = loadAddon();
      const engines: Engine[] = [
        new addon.Engine({ backend: "cpu", threads: 1, hierarchicalSelection: "on" }),
        new addon.Engine({ backend: "cpu", threads: 1, hierarchicalSelection: "off" }),
      ];
      const ss = engines.map((engine) => openSession(c, { capacityPages: 256, engine }));
      const ref = new ReferenceLayer(c);
      try {
        const qn = c.qHeads * c.headDim,
          kvn = c.kvHeads * c.headDim;
        let tokens = 0;
        // 133 pages and a bit (4 full groups and a part of a fifth), in two chunks.
        for (const n of [301, 233]) {
          const q = query(c0.keys, rng, n * qn),
            k = keysFor(c0.keys, rng, tokens, n, kvn),
            v = values(rng, n * kvn);
          const outs = await Promise.all(ss.map((s) => s.engine.prefillAttend(s.session, 0, q, k, v, n)));
          expect(Array.from(outs[0])).toEqual(Array.from(outs[1]));
          ref.prefill(k, v, n, q.subarray((n - 1) * qn));
          tokens += n;
        }
        // Decode across several page and one group boundary (2 * 32 * P tokens later).
        for (let t = 0; t < 40; t++) {
          const q = query(c0.keys, rng, qn),
            k = keysFor(c0.keys, rng, tokens, 1, kvn),
            v = values(rng, kvn);
          const outs = [];
          for (const s of ss) outs.push((await s.engine.decode(0, [{ session: s.session, q, k, v }]))[0]);
          const want = ref.decode(q, k, v);
          tokens += 1;
          for (let h = 0; h < c.kvHeads; h++) {
            const got = Array.from(ss[0].engine.lastAttendedTokens(ss[0].session, 0, h));
            expect(got, `step ${t} head ${h} vs flat`).toEqual(Array.from(ss[1].engine.lastAttendedTokens(ss[1].session, 0, h)));
            expect(got, `step ${t} head ${h} vs reference`).toEqual(want.attended[h]);
          }
          expect(Array.from(outs[0]), `step ${t}`).toEqual(Array.from(outs[1]));
        }
        for (const s of ss) await s.engine.sync(s.session);
        const [a, b] = ss.map((s) => s.engine.stats(s.session));
        expect(a.pagesSelected).toBe(b.pagesSelected);
        expect(a.pagesHit).toBe(b.pagesHit);
        expect(a.pagesRecalled).toBe(b.pagesRecalled);
        expect(a.corrections).toBe(b.corrections);
      } finally {
        for (const s of ss) await s.close();
      }
    });

  it("setHierarchicalSelection switches a running engine; the pages stay the flat scan's", async () => {
    const rng = new Prng(seed + 53);
    const c: PolicyConfig = {
      qHeads: 4, kvHeads: 2, headDim: D, pageSize: P, summary: "maxmin", combine: "max",
      sinkTokens: 3 * P, windowTokens: 5 * P, selectTokens: 8 * P, tau: 0.9, mode: "oracle", dtype: "f32",
    };
    const addon = loadAddon();
    const engine = new addon.Engine({ backend: "cpu", threads: 1, hierarchicalSelection: "off" });
    expect(() => engine.setHierarchicalSelection("sometimes" as "on")).toThrow(TypeError);
    const s = openSession(c, { capacityPages: 256, engine });
    const ref = new ReferenceLayer(c);
    try {
      const qn = c.qHeads * D, kvn = c.kvHeads * D, n = 600;
      const q0 = query("random", rng, n * qn), k0 = keysFor("random", rng, 0, n, kvn), v0 = values(rng, n * kvn);
      await engine.prefillAttend(s.session, 0, q0, k0, v0, n);
      ref.prefill(k0, v0, n, q0.subarray((n - 1) * qn));
      const modes = ["on", "off", "auto", "on"] as const;
      for (let t = 0; t < 12; t++) {
        engine.setHierarchicalSelection(modes[t % modes.length]);
        const q = query("random", rng, qn), k = keysFor("random", rng, n + t, 1, kvn), v = values(rng, kvn);
        await engine.decode(0, [{ session: s.session, q, k, v }]);
        const want = ref.decode(q, k, v);
        for (let h = 0; h < c.kvHeads; h++)
          expect(Array.from(engine.lastAttendedTokens(s.session, 0, h)), `step ${t} (${modes[t % modes.length]}) head ${h}`).toEqual(want.attended[h]);
      }
    } finally {
      await s.close();
    }
  });

  it("softmax_mean with several query heads per KV head: a full selection of the budget's size", async () => {
    // Not exact (Hierarchy.h): the heads are weighed by the softmax over the group bounds.
    const rng = new Prng(seed + 31);
    const c: PolicyConfig = {
      qHeads: 8, kvHeads: 2, headDim: D, pageSize: P, summary: "maxmin", combine: "softmax_mean",
      sinkTokens: 3 * P, windowTokens: 5 * P, selectTokens: 8 * P, tau: 0.9, mode: "oracle", dtype: "f32",
    };
    const addon = loadAddon();
    const s = openSession(c, { capacityPages: 256, engine: new addon.Engine({ backend: "cpu", threads: 1, hierarchicalSelection: "on" }) });
    try {
      const qn = c.qHeads * D, kvn = c.kvHeads * D, n = 400;
      await s.engine.prefillAttend(s.session, 0, query("random", rng, n * qn), keysFor("random", rng, 0, n, kvn), values(rng, n * kvn), n);
      await s.engine.decode(0, [{ session: s.session, q: query("random", rng, qn), k: keysFor("random", rng, n, 1, kvn), v: values(rng, kvn) }]);
      for (let h = 0; h < c.kvHeads; h++) {
        const att = Array.from(s.engine.lastAttendedTokens(s.session, 0, h));
        expect(att.length).toBe(3 * P + 8 * P + 4 * P + 1);
      }
    } finally {
      await s.close();
    }
  });
});
