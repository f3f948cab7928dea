/**
 * The Attention stream against the engine through real processes: prefill + decode outputs match
 * exact float64 attention while the budget covers the context, bf16 on the wire, one decode
 * request holding several sessions, batching across streams, the pages the engine offloaded are
 * in the kvstore's segment in HND order, and every kind of bad message ends the stream with the
 * status naming the field.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { status } from "@grpc/grpc-js";
import { loadAddon } from "../../native/binding.js";
import { DType } from "../../proto/gen/freekv/v1/common.js";
import { AttentionStream, f32Tensor, tensorToF32, toBf16 } from "../helpers/attention-stream.js";
import { exactAttention, relError as relativeError } from "../../tools/reference/attention.js";
import { prng, randomF32 } from "../helpers/prng.js";
import { ATTENTION, QUIET, computeClient, fetchMetrics, kvstoreClient, metricValue, startTiers, unary, type Tiers } from "../helpers/services.js";

const G = { layers: 2, queryHeads: 4, kvHeads: 2, headDim: 32, kvDtype: 1 };
// Budget = sink 32 + select 512 + window 32 = 576 tokens >= every context below: exact output.
const R = { pageSize: 16, sinkTokens: 32, windowTokens: 32, selectTokens: 512 };
const KV = G.kvHeads * G.headDim;
const QD = G.queryHeads * G.headDim;

let tiers: Tiers;
let compute: ReturnType<typeof computeClient>;
let kv: ReturnType<typeof kvstoreClient>;

beforeAll(async () => {
  tiers = await startTiers({
    kvstoreEnv: QUIET,
    // A wide batching window so that two streams' decodes of one layer surely meet.
    computeEnv: { ...QUIET, FREEKV_DECODE_BATCH_WINDOW_US: "20000", FREEKV_COMMIT_CHECKSUMS: "1", FREEKV_THREADS: "2" },
  });
  compute = computeClient(tiers.compute.address);
  kv = kvstoreClient(tiers.kvstore.address);
});

afterAll(async () => {
  compute?.close();
  kv?.close();
  await tiers?.stop();
});

/** A session's history per layer, for the reference. */
class History {
  keys: Float32Array[][] = Array.from({ length: G.layers }, () => []);
  values: Float32Array[][] = Array.from({ length: G.layers }, () => []);
  push(layer: number, k: Float32Array, v: Float32Array, n: number) {
    for (let t = 0; t < n; t++) {
      this.keys[layer].push(k.slice(t * KV, (t + 1) * KV));
      this.values[layer].push(v.slice(t * KV, (t + 1) * KV));
    }
  }
}

async function create(id: string, maxContextTokens = 600) {
  await unary(compute, "createSession", { sessionId: id, kind: ATTENTION, geometry: G, retrieval: R, maxContextTokens });
}

describe("Attention stream with the engine", () => {
  it("prefill then decode equals exact attention (budget covers the context), f32 and bf16", async () => {
    const rand = prng(20261128);
    await create("att-f32");
    const s = new AttentionStream(compute);
    const h = new History();
    const n = 200;
    for (let l = 0; l < G.layers; l++) {
      const k = randomF32(n * KV, rand);
      const v = randomF32(n * KV, rand);
      const r = await s.prefill("att-f32", l, f32Tensor(k, [n, G.kvHeads, G.headDim]), f32Tensor(v, [n, G.kvHeads, G.headDim]));
      expect(r.result?.$case === "prefill" && r.result.value.contextTokens).toBe(n);
      h.push(l, k, v, n);
    }
    let worst = 0;
    for (let step = 0; step < 12; step++) {
      for (let l = 0; l < G.layers; l++) {
        const q = randomF32(QD, rand, 2);
        const k = randomF32(KV, rand);
        const v = randomF32(KV, rand);
        const [out] = await s.decode(l, [{ sessionId: "att-f32", q: f32Tensor(q, [G.queryHeads, G.headDim]), k: f32Tensor(k, [G.kvHeads, G.headDim]), v: f32Tensor(v, [G.kvHeads, G.headDim]) }]);
        expect(out.shape).toEqual([G.queryHeads, G.headDim]);
        expect(out.dtype).toBe(DType.D_TYPE_FLOAT32);
        h.push(l, k, v, 1);
        const ref = exactAttention(q, h.keys[l], h.values[l], G.queryHeads, G.kvHeads, G.headDim);
        worst = Math.max(worst, relativeError(tensorToF32(out), ref));
      }
    }
    expect(worst).toBeLessThan(1e-5);
    expect(await s.close()).toBeUndefined();
    const got = await unary<{ session: { contextTokens: number; stats: { decodeSteps: number } } }>(compute, "getSession", { sessionId: "att-f32" });
    expect(got.session.contextTokens).toBe(212);

    // bf16 on the wire: the reference attends over the bf16-rounded inputs; output comes back bf16.
    await create("att-bf16");
    const b = new AttentionStream(compute);
    const hb = new History();
    const bt = (x: Float32Array, shape: number[]) => {
      const { bytes, rounded } = toBf16(x);
      return { t: { dtype: DType.D_TYPE_BFLOAT16, shape, data: bytes }, rounded };
    };
    for (let l = 0; l < G.layers; l++) {
      const k = bt(randomF32(64 * KV, rand), [64, G.kvHeads, G.headDim]);
      const v = bt(randomF32(64 * KV, rand), [64, G.kvHeads, G.headDim]);
      await b.prefill("att-bf16", l, k.t, v.t);
      hb.push(l, k.rounded, v.rounded, 64);
    }
    for (let l = 0; l < G.layers; l++) {
      const q = bt(randomF32(QD, rand), [G.queryHeads, G.headDim]);
      const k = bt(randomF32(KV, rand), [G.kvHeads, G.headDim]);
      const v = bt(randomF32(KV, rand), [G.kvHeads, G.headDim]);
      const [out] = await b.decode(l, [{ sessionId: "att-bf16", q: q.t, k: k.t, v: v.t }]);
      expect(out.dtype).toBe(DType.D_TYPE_BFLOAT16);
      hb.push(l, k.rounded, v.rounded, 1);
      const ref = exactAttention(q.rounded, hb.keys[l], hb.values[l], G.queryHeads, G.kvHeads, G.headDim);
      expect(relativeError(tensorToF32(out), ref)).toBeLessThan(8e-3); // one bf16 rounding of the output
    }
    await b.close();
  });

  it("the pages the engine offloaded are committed at the kvstore and lie in its segment in HND order", async () => {
    const rand = prng(77);
    await create("att-hnd");
    const s = new AttentionStream(compute);
    const n = 100; // 6 full pages of 16 and a partial one
    const ks: Float32Array[] = [];
    for (let l = 0; l < G.layers; l++) {
      const k = randomF32(n * KV, rand);
      const v = randomF32(n * KV, rand);
      ks.push(k, v);
      await s.prefill("att-hnd", l, f32Tensor(k, [n, G.kvHeads, G.headDim]), f32Tensor(v, [n, G.kvHeads, G.headDim]));
    }
    await s.close();
    // Commits run in the background after the response; poll the kvstore briefly.
    let att: Record<string, any> = {};
    for (let i = 0; i < 50; i++) {
      att = await unary<Record<string, any>>(kv, "attachSession", { sessionId: "att-hnd" });
      if (att.committedPages.every((c: number) => c === Math.floor(n / 16))) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    expect(att.committedPages).toEqual([6, 6]);
    const store = loadAddon().ShmSegment.open(att.store.name);
    const f = new Float32Array(store.buffer());
    const P = 16;
    let mismatches = 0;
    for (let l = 0; l < G.layers; l++) {
      const [k, v] = [ks[2 * l], ks[2 * l + 1]];
      for (let p = 0; p < 6; p++)
        for (let h = 0; h < G.kvHeads; h++)
          for (let t = 0; t < P; t++)
            for (let d = 0; d < G.headDim; d++) {
              const base = (l * att.layout.layerStrideBytes + p * att.layout.pageBytes + h * att.layout.headPageBytes) / 4;
              const tok = p * P + t;
              if (f[base + t * G.headDim + d] !== k[tok * KV + h * G.headDim + d]) mismatches++;
              if (f[base + (P + t) * G.headDim + d] !== v[tok * KV + h * G.headDim + d]) mismatches++;
            }
    }
    store.close();
    expect(mismatches).toBe(0);
  });

  it("one decode request with several sessions answers in order; two streams' decodes share one engine call", async () => {
    const rand = prng(4242);
    const ids = ["multi-a", "multi-b", "multi-c"];
    const hist = new Map<string, History>();
    const s = new AttentionStream(compute);
    for (const id of ids) {
      await create(id);
      const h = new History();
      hist.set(id, h);
      for (let l = 0; l < G.layers; l++) {
        const n = 40 + Math.floor(rand() * 40);
        const k = randomF32(n * KV, rand);
        const v = randomF32(n * KV, rand);
        await s.prefill(id, l, f32Tensor(k, [n, G.kvHeads, G.headDim]), f32Tensor(v, [n, G.kvHeads, G.headDim]));
        h.push(l, k, v, n);
      }
    }
    const item = (id: string, l: number) => {
      const q = randomF32(QD, rand);
      const k = randomF32(KV, rand);
      const v = randomF32(KV, rand);
      hist.get(id)!.push(l, k, v, 1);
      return { id, q, l, req: { sessionId: id, q: f32Tensor(q, [G.queryHeads, G.headDim]), k: f32Tensor(k, [G.kvHeads, G.headDim]), v: f32Tensor(v, [G.kvHeads, G.headDim]) } };
    };
    // Items listed c, a, b: outputs must come back in that order.
    const items = [item("multi-c", 0), item("multi-a", 0), item("multi-b", 0)];
    const outs = await s.decode(0, items.map((i) => i.req));
    outs.forEach((o, i) => {
      const h = hist.get(items[i].id)!;
      expect(relativeError(tensorToF32(o), exactAttention(items[i].q, h.keys[0], h.values[0], G.queryHeads, G.kvHeads, G.headDim))).toBeLessThan(1e-5);
    });
    const before = await fetchMetrics(tiers.compute.metricsPort);
    const s2 = new AttentionStream(compute);
    const x = item("multi-a", 1);
    const y = item("multi-b", 1);
    const [ox, oy] = await Promise.all([s.decode(1, [x.req]), s2.decode(1, [y.req])]);
    const after = await fetchMetrics(tiers.compute.metricsPort);
    for (const [o, it] of [
      [ox[0], x],
      [oy[0], y],
    ] as const) {
      const h = hist.get(it.id)!;
      expect(relativeError(tensorToF32(o), exactAttention(it.q, h.keys[1], h.values[1], G.queryHeads, G.kvHeads, G.headDim))).toBeLessThan(1e-5);
    }
    const calls = (t: string) => metricValue(t, "freekv_compute_decode_batch_size_count") ?? 0;
    const sessions = (t: string) => metricValue(t, "freekv_compute_decode_batch_size_sum") ?? 0;
    expect(calls(after) - calls(before)).toBe(1);
    expect(sessions(after) - sessions(before)).toBe(2);
    await s.close();
    await s2.close();
  });
});

describe("Attention stream errors", () => {
  beforeAll(async () => {
    await create("bad-1", 128);
    // A model session (the built-in model's): its context is its Generate turns'.
    await unary(compute, "createSession", { sessionId: "model-1", maxContextTokens: 256 });
  });

  const k2 = (n: number, fill?: (a: Float32Array) => void) => {
    const a = randomF32(n * KV, prng(n));
    fill?.(a);
    return f32Tensor(a, [n, G.kvHeads, G.headDim]);
  };
  const cases: Array<[string, (s: AttentionStream) => Promise<unknown>, number, string]> = [
    ["unknown session", (s) => s.prefill("nobody", 0, k2(4), k2(4)), status.NOT_FOUND, "prefill.session_id"],
    ["layer out of range", (s) => s.prefill("bad-1", 2, k2(4), k2(4)), status.INVALID_ARGUMENT, "prefill.layer:"],
    ["k/v token counts differ", (s) => s.prefill("bad-1", 0, k2(4), k2(5)), status.INVALID_ARGUMENT, "prefill.v.shape:"],
    [
      "wrong head dim",
      (s) => s.prefill("bad-1", 0, f32Tensor(new Float32Array(4 * G.kvHeads * 16).fill(0.5), [4, G.kvHeads, 16]), k2(4)),
      status.INVALID_ARGUMENT,
      "prefill.k.shape:",
    ],
    [
      "NaN in k",
      (s) =>
        s.prefill(
          "bad-1",
          0,
          k2(4, (a) => (a[5] = Number.NaN)),
          k2(4),
        ),
      status.INVALID_ARGUMENT,
      "prefill.k: element 5 is NaN",
    ],
    [
      "byte length not matching the shape",
      (s) => s.prefill("bad-1", 0, { dtype: DType.D_TYPE_FLOAT32, shape: [4, G.kvHeads, G.headDim], data: Buffer.alloc(10) }, k2(4)),
      status.INVALID_ARGUMENT,
      "prefill.k.data:",
    ],
    ["float16 dtype", (s) => s.prefill("bad-1", 0, { ...k2(4), dtype: DType.D_TYPE_FLOAT16 }, k2(4)), status.INVALID_ARGUMENT, "prefill.k.dtype:"],
    ["over max_context_tokens", (s) => s.prefill("bad-1", 0, k2(129), k2(129)), status.RESOURCE_EXHAUSTED, "prefill.k:"],
    ["a model session", (s) => s.prefill("model-1", 0, k2(4), k2(4)), status.FAILED_PRECONDITION, 'prefill.session_id: session "model-1" is a model session'],
    [
      "Inf in the third item's q",
      (s) => {
        const q = (bad: boolean) => {
          const a = randomF32(QD, prng(9));
          if (bad) a[3] = Infinity;
          return f32Tensor(a, [G.queryHeads, G.headDim]);
        };
        const kv1 = f32Tensor(randomF32(KV, prng(3)), [G.kvHeads, G.headDim]);
        return s.decode(0, [
          { sessionId: "bad-1", q: q(false), k: kv1, v: kv1 },
          { sessionId: "bad-2", q: q(false), k: kv1, v: kv1 },
          { sessionId: "bad-3", q: q(true), k: kv1, v: kv1 },
        ]);
      },
      status.INVALID_ARGUMENT,
      "decode.items[2].q: element 3 is Inf",
    ],
    [
      "a session twice in one decode",
      (s) => {
        const t = f32Tensor(randomF32(KV, prng(3)), [G.kvHeads, G.headDim]);
        const q = f32Tensor(randomF32(QD, prng(4)), [G.queryHeads, G.headDim]);
        return s.decode(0, [
          { sessionId: "bad-1", q, k: t, v: t },
          { sessionId: "bad-1", q, k: t, v: t },
        ]);
      },
      status.INVALID_ARGUMENT,
      "decode.items[1].session_id:",
    ],
  ];
  for (const [name, op, code, prefix] of cases) {
    it(name, async () => {
      await create("bad-2", 128).catch(() => undefined);
      await create("bad-3", 128).catch(() => undefined);
      const s = new AttentionStream(compute);
      const err = await op(s).then(
        () => undefined,
        (e: { code: number; details: string }) => e,
      );
      expect(err, "the stream should have failed").toBeDefined();
      expect(err!.code).toBe(code);
      expect(err!.details.startsWith(prefix)).toBe(true);
    });
  }
});
