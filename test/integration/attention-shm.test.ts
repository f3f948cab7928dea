/**
 * The Attention stream's shared-memory tensor exchange through real processes: outputs through
 * the exchange equal the bytes path's outputs bit for bit (same inputs, twin sessions) and exact
 * float64 attention while the budget covers the context; bad offsets, sizes, shapes and NaN end
 * the stream with INVALID_ARGUMENT naming the field; the segment is mode 0600 and gone after the
 * stream ends, however it ends.
 */
import { statSync } from "node:fs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { status } from "@grpc/grpc-js";
import { loadAddon, type ShmSegment } from "../../native/binding.js";
import { DType, type Tensor } from "../../proto/gen/freekv/v1/common.js";
import type { AttentionDecodeItem, AttentionResponse, TensorRef } from "../../proto/gen/freekv/v1/compute.js";
import { AttentionStream, f32Tensor, tensorToF32, toBf16 } from "../helpers/attention-stream.js";
import { exactAttention, relError as relativeError } from "../../tools/reference/attention.js";
import { prng, randomF32 } from "../helpers/prng.js";
import { ATTENTION, QUIET, computeClient, shmSegments, startTiers, unary, type Tiers } from "../helpers/services.js";

const hasEngine = typeof loadAddon().Engine === "function";
const G = { layers: 2, queryHeads: 4, kvHeads: 2, headDim: 32, kvDtype: 1 };
// Budget = sink 32 + select 512 + window 32 = 576 tokens >= every context below: exact output.
const R = { pageSize: 16, sinkTokens: 32, windowTokens: 32, selectTokens: 512 };
const KV = G.kvHeads * G.headDim;
const QD = G.queryHeads * G.headDim;

let tiers: Tiers;
let compute: ReturnType<typeof computeClient>;

beforeAll(async () => {
  tiers = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...QUIET, FREEKV_THREADS: "2" } });
  compute = computeClient(tiers.compute.address);
});

afterAll(async () => {
  compute?.close();
  await tiers?.stop();
});

async function create(id: string, maxContextTokens = 600) {
  await unary(compute, "createSession", { sessionId: id, kind: ATTENTION, geometry: G, retrieval: R, maxContextTokens });
}

/** The client side of an exchange: the mapping and a bump allocator of 16-byte aligned regions. */
class ClientExchange {
  next = 0;
  readonly bytes: Uint8Array;
  private constructor(
    readonly name: string,
    readonly seg: ShmSegment,
  ) {
    this.bytes = new Uint8Array(seg.buffer());
  }

  static async open(s: AttentionStream, sizeBytes = 1 << 20): Promise<ClientExchange> {
    const r = await s.send({ op: { $case: "openExchange", value: { sizeBytes } } });
    if (r.result?.$case !== "exchange") throw new Error("expected an exchange result");
    expect(r.result.value.alignment).toBe(16);
    expect(r.result.value.sizeBytes).toBeGreaterThanOrEqual(sizeBytes);
    const seg = loadAddon().ShmSegment.open(r.result.value.segmentName);
    expect(seg.size).toBe(r.result.value.sizeBytes);
    return new ClientExchange(r.result.value.segmentName, seg);
  }

  /** Reserves `bytes` and returns the offset. */
  alloc(bytes: number): number {
    const off = this.next;
    this.next += Math.ceil(bytes / 16) * 16;
    if (this.next > this.seg.size) throw new Error("test exchange too small");
    return off;
  }

  /** Puts a wire tensor's bytes into the segment and returns the ref to it. */
  put(t: Tensor): TensorRef {
    const offset = this.alloc(t.data.length);
    this.bytes.set(t.data, offset);
    return { offset, dtype: t.dtype, shape: t.shape };
  }

  /** Reads an output written at `offset` as a wire tensor (copied). */
  get(offset: number, dtype: DType, shape: number[]): Tensor {
    const n = shape.reduce((a, b) => a * b, 1) * (dtype === DType.D_TYPE_BFLOAT16 ? 2 : 4);
    return { dtype, shape, data: Buffer.from(this.bytes.slice(offset, offset + n)) };
  }

  reset() {
    this.next = 0;
  }

  close() {
    this.seg.close();
  }
}

function decodeOffsets(r: AttentionResponse): number[] {
  if (r.result?.$case !== "decode") throw new Error("expected a decode result");
  expect(r.result.value.outputs).toEqual([]);
  return r.result.value.outputOffsets;
}

const sameBits = (a: Tensor, b: Tensor) => a.dtype === b.dtype && Buffer.compare(a.data, b.data) === 0;

describe.skipIf(!hasEngine)("Attention stream through the tensor exchange", () => {
  it("outputs equal the bytes path's bit for bit and exact attention (f32 and bf16, several sessions per decode); the segment is removed at the end", async () => {
    const rand = prng(5150);
    const ids = ["xch-a", "xch-b"];
    for (const id of ids) {
      await create(`${id}-shm`);
      await create(`${id}-bytes`);
    }
    const shm = new AttentionStream(compute);
    const bytes = new AttentionStream(compute);
    const x = await ClientExchange.open(shm);
    expect(shmSegments().has(x.name)).toBe(true);
    expect(statSync(`/dev/shm${x.name}`).mode & 0o777).toBe(0o600);

    // Per session and layer: the history the reference attends over.
    const keys = new Map<string, Float32Array[]>();
    const values = new Map<string, Float32Array[]>();
    const hist = (id: string, l: number) => {
      const k = `${id}/${l}`;
      if (!keys.has(k)) {
        keys.set(k, []);
        values.set(k, []);
      }
      return { keys: keys.get(k)!, values: values.get(k)! };
    };
    for (const id of ids) {
      for (let l = 0; l < G.layers; l++) {
        const n = 120 + Math.floor(rand() * 60);
        const k = randomF32(n * KV, rand);
        const v = randomF32(n * KV, rand);
        const kt = f32Tensor(k, [n, G.kvHeads, G.headDim]);
        const vt = f32Tensor(v, [n, G.kvHeads, G.headDim]);
        x.reset();
        const rs = await shm.send({ op: { $case: "prefill", value: { sessionId: `${id}-shm`, layer: l, kRef: x.put(kt), vRef: x.put(vt) } } });
        const rb = await bytes.prefill(`${id}-bytes`, l, kt, vt);
        expect(rs.result?.$case === "prefill" && rs.result.value.contextTokens).toBe(n);
        expect(rb.result?.$case === "prefill" && rb.result.value.contextTokens).toBe(n);
        const h = hist(id, l);
        for (let t = 0; t < n; t++) {
          h.keys.push(k.slice(t * KV, (t + 1) * KV));
          h.values.push(v.slice(t * KV, (t + 1) * KV));
        }
      }
    }

    let worst = 0;
    let compared = 0;
    for (let step = 0; step < 6; step++) {
      for (let l = 0; l < G.layers; l++) {
        // Odd steps send bf16: the reference attends over the bf16-rounded inputs.
        const bf = step % 2 === 1;
        const dtype = bf ? DType.D_TYPE_BFLOAT16 : DType.D_TYPE_FLOAT32;
        const wire = (a: Float32Array, shape: number[]) => {
          if (!bf) return { t: f32Tensor(a, shape), r: a };
          const { bytes: b, rounded } = toBf16(a);
          return { t: { dtype, shape, data: b }, r: rounded };
        };
        const inputs = ids.map((id) => ({
          id,
          q: wire(randomF32(QD, rand, 2), [G.queryHeads, G.headDim]),
          k: wire(randomF32(KV, rand), [G.kvHeads, G.headDim]),
          v: wire(randomF32(KV, rand), [G.kvHeads, G.headDim]),
        }));
        x.reset();
        const items = inputs.map((it) => ({
          sessionId: `${it.id}-shm`,
          qRef: x.put(it.q.t),
          kRef: x.put(it.k.t),
          vRef: x.put(it.v.t),
          outputOffset: x.alloc(QD * 4),
        }));
        const offsets = decodeOffsets(await shm.send({ op: { $case: "decode", value: { layer: l, items } } }));
        expect(offsets).toEqual(items.map((it) => it.outputOffset));
        const viaBytes = await bytes.decode(
          l,
          inputs.map((it) => ({ sessionId: `${it.id}-bytes`, q: it.q.t, k: it.k.t, v: it.v.t })),
        );
        inputs.forEach((it, i) => {
          const out = x.get(offsets[i], dtype, [G.queryHeads, G.headDim]);
          expect(sameBits(out, viaBytes[i]), `step ${step} layer ${l} ${it.id}`).toBe(true);
          compared++;
          const h = hist(it.id, l);
          h.keys.push(it.k.r);
          h.values.push(it.v.r);
          const err = relativeError(tensorToF32(out), exactAttention(it.q.r, h.keys, h.values, G.queryHeads, G.kvHeads, G.headDim));
          if (bf) expect(err).toBeLessThan(8e-3); // one bf16 rounding of the output
          else worst = Math.max(worst, err);
        });
      }
    }
    expect(compared).toBe(6 * G.layers * ids.length);
    expect(worst).toBeLessThan(1e-5);
    x.close();
    const e = await shm.close();
    if (e) console.log(tiers.compute.output.slice(-30).join("\n"));
    expect(e).toBeUndefined();
    expect(await bytes.close()).toBeUndefined();
    expect(shmSegments().has(x.name)).toBe(false);
    const got = await unary<{ session: { contextTokens: number } }>(compute, "getSession", { sessionId: "xch-a-shm" });
    const twin = await unary<{ session: { contextTokens: number } }>(compute, "getSession", { sessionId: "xch-a-bytes" });
    expect(got.session.contextTokens).toBe(twin.session.contextTokens);
  });
});

describe("Attention tensor exchange errors and lifetime", () => {
  beforeAll(async () => {
    await create("xbad-1", 128);
    await create("xbad-2", 128);
  });

  const kvRef = (x: ClientExchange, n: number, fill?: (a: Float32Array) => void) => {
    const a = randomF32(n * KV, prng(n + 1));
    fill?.(a);
    return x.put(f32Tensor(a, [n, G.kvHeads, G.headDim]));
  };
  const qRef = (x: ClientExchange) => x.put(f32Tensor(randomF32(QD, prng(7)), [G.queryHeads, G.headDim]));
  const newKv = (x: ClientExchange) => x.put(f32Tensor(randomF32(KV, prng(3)), [G.kvHeads, G.headDim]));
  const step = (x: ClientExchange, over: Record<string, unknown> = {}) => ({ sessionId: "xbad-1", qRef: qRef(x), kRef: newKv(x), vRef: newKv(x), outputOffset: x.alloc(QD * 4), ...over });
  const prefill = (s: AttentionStream, value: Record<string, unknown>) => s.send({ op: { $case: "prefill", value: { sessionId: "xbad-1", layer: 0, ...value } } });
  const decode = (s: AttentionStream, items: Array<Record<string, unknown>>) => s.send({ op: { $case: "decode", value: { layer: 0, items: items as unknown as AttentionDecodeItem[] } } });

  const cases: Array<[string, (s: AttentionStream, x: ClientExchange) => Promise<unknown>, number, string]> = [
    ["both k and k_ref", (s, x) => prefill(s, { k: f32Tensor(randomF32(4 * KV, prng(1)), [4, G.kvHeads, G.headDim]), kRef: kvRef(x, 4), vRef: kvRef(x, 4) }), status.INVALID_ARGUMENT, "prefill.k: set either k or k_ref, not both"],
    ["neither v nor v_ref", (s, x) => prefill(s, { kRef: kvRef(x, 4) }), status.INVALID_ARGUMENT, "prefill.v: is required"],
    ["offset not 16-byte aligned", (s, x) => prefill(s, { kRef: { ...kvRef(x, 4), offset: 8 }, vRef: kvRef(x, 4) }), status.INVALID_ARGUMENT, "prefill.k_ref.offset: 8 is not a multiple of 16"],
    ["offset past the end", (s, x) => prefill(s, { kRef: kvRef(x, 4), vRef: { ...kvRef(x, 4), offset: x.seg.size - 16 } }), status.INVALID_ARGUMENT, "prefill.v_ref.offset:"],
    ["offset beyond 4 GiB", (s, x) => prefill(s, { kRef: { ...kvRef(x, 4), offset: 2 ** 33 }, vRef: kvRef(x, 4) }), status.INVALID_ARGUMENT, "prefill.k_ref.offset:"],
    ["size too large for the segment", (s, x) => prefill(s, { kRef: { ...kvRef(x, 4), offset: 48 << 10, shape: [120, G.kvHeads, G.headDim] }, vRef: kvRef(x, 4) }), status.INVALID_ARGUMENT, "prefill.k_ref.offset:"],
    // The session's room is checked on the claimed shape before the range is read (or even checked).
    ["more tokens than the session's room", (s, x) => prefill(s, { kRef: { ...kvRef(x, 4), shape: [5000, G.kvHeads, G.headDim] }, vRef: kvRef(x, 4) }), status.RESOURCE_EXHAUSTED, "prefill.k: 5000 more tokens would take layer 0"],
    ["k/v token counts differ", (s, x) => prefill(s, { kRef: kvRef(x, 4), vRef: kvRef(x, 5) }), status.INVALID_ARGUMENT, "prefill.v_ref.shape:"],
    ["float16 dtype", (s, x) => prefill(s, { kRef: { ...kvRef(x, 4), dtype: DType.D_TYPE_FLOAT16 }, vRef: kvRef(x, 4) }), status.INVALID_ARGUMENT, "prefill.k_ref.dtype:"],
    ["NaN in k_ref", (s, x) => prefill(s, { kRef: kvRef(x, 4, (a) => (a[9] = Number.NaN)), vRef: kvRef(x, 4) }), status.INVALID_ARGUMENT, "prefill.k_ref: element 9 is NaN"],
    ["Inf in the second item's v_ref", (s, x) => decode(s, [step(x), step(x, { sessionId: "xbad-2", vRef: x.put(f32Tensor(Float32Array.from({ length: KV }, (_, i) => (i === 4 ? -Infinity : 0.25 * i)), [G.kvHeads, G.headDim])) })]), status.INVALID_ARGUMENT, "decode.items[1].v_ref: element 4 is Inf"],
    ["wrong q shape", (s, x) => decode(s, [step(x, { qRef: { ...qRef(x), shape: [G.queryHeads, 16] } })]), status.INVALID_ARGUMENT, "decode.items[0].q_ref.shape:"],
    ["output_offset missing", (s, x) => decode(s, [step(x, { outputOffset: undefined })]), status.INVALID_ARGUMENT, "decode.items[0].output_offset: is required"],
    ["output_offset past the end", (s, x) => decode(s, [step(x, { outputOffset: x.seg.size - 256 })]), status.INVALID_ARGUMENT, "decode.items[0].output_offset:"],
    ["items mixing q and q_ref", (s, x) => decode(s, [step(x), step(x, { sessionId: "xbad-2", qRef: undefined, q: f32Tensor(randomF32(QD, prng(2)), [G.queryHeads, G.headDim]) })]), status.INVALID_ARGUMENT, "decode.items[1].q_ref:"],
    ["a second open_exchange", (s) => s.send({ op: { $case: "openExchange", value: { sizeBytes: 4096 } } }), status.INVALID_ARGUMENT, "open_exchange:"],
  ];
  for (const [name, op, code, prefix] of cases) {
    it(name, async () => {
      const s = new AttentionStream(compute);
      const x = await ClientExchange.open(s, 64 << 10);
      const err = await op(s, x).then(
        () => undefined,
        (e: { code: number; details: string }) => e,
      );
      x.close();
      expect(err, "the stream should have failed").toBeDefined();
      expect(err!.code).toBe(code);
      expect(err!.details.startsWith(prefix), err!.details).toBe(true);
      await s.ended;
      expect(shmSegments().has(x.name)).toBe(false);
    });
  }

  it("a ref without an exchange is FAILED_PRECONDITION; an oversized exchange is refused", async () => {
    const s = new AttentionStream(compute);
    const ref = { offset: 0, dtype: DType.D_TYPE_FLOAT32, shape: [4, G.kvHeads, G.headDim] };
    const e = await prefill(s, { kRef: ref, vRef: ref }).catch((x: { code: number; details: string }) => x);
    expect(e).toMatchObject({ code: status.FAILED_PRECONDITION });
    expect((e as { details: string }).details.startsWith("prefill.k_ref: no tensor exchange")).toBe(true);
    const s2 = new AttentionStream(compute);
    const before = shmSegments();
    const e2 = await s2.send({ op: { $case: "openExchange", value: { sizeBytes: 2 ** 31 } } }).catch((x: { code: number; details: string }) => x);
    expect(e2).toMatchObject({ code: status.INVALID_ARGUMENT });
    expect((e2 as { details: string }).details.startsWith("open_exchange.size_bytes:")).toBe(true);
    expect([...shmSegments()].filter((n) => !before.has(n) && n.startsWith("/freekv-xch-"))).toEqual([]);
  });

  it("the segment is removed when the client cancels the stream, and when the server drains", async () => {
    const s = new AttentionStream(compute);
    const x = await ClientExchange.open(s, 4096);
    x.close();
    expect(shmSegments().has(x.name)).toBe(true);
    s.cancel();
    await s.ended;
    for (let i = 0; i < 50 && shmSegments().has(x.name); i++) await new Promise((r) => setTimeout(r, 20));
    expect(shmSegments().has(x.name)).toBe(false);

    // A stream still open while the tiers stop: the drain ends it and the segment goes with it.
    const own = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...QUIET, FREEKV_SHUTDOWN_GRACE_MS: "500" } });
    const c = computeClient(own.compute.address);
    const s2 = new AttentionStream(c);
    const x2 = await ClientExchange.open(s2, 4096);
    x2.close();
    expect(shmSegments().has(x2.name)).toBe(true);
    await own.stop();
    c.close();
    expect(shmSegments().has(x2.name)).toBe(false);
  });
});
