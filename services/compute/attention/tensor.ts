/**
 * Tensors on the wire (bytes + dtype + shape) to float32 and back. Every check names the field
 * it refers to ("decode.items[2].q.shape"), because a disaggregated engine sending a wrong
 * tensor must learn which one.
 */
import { DType, type Tensor } from "../../../proto/gen/freekv/v1/common.js";
import { invalidArgument } from "../../common/errors.js";

const fmt = (s: number[]) => `[${s.join(", ")}]`;

/** bfloat16 -> float32: the high half of the float32 bits. */
export function bf16ToF32(src: Uint8Array, n: number): Float32Array {
  const out = new Float32Array(n);
  const u32 = new Uint32Array(out.buffer);
  for (let i = 0; i < n; i++) u32[i] = (src[2 * i] | (src[2 * i + 1] << 8)) << 16;
  return out;
}

/** float32 -> bfloat16 with round-to-nearest-even (NaN stays NaN). */
export function f32ToBf16(src: Float32Array): Uint8Array {
  const u32 = new Uint32Array(src.buffer, src.byteOffset, src.length);
  const out = new Uint8Array(src.length * 2);
  for (let i = 0; i < src.length; i++) {
    const x = u32[i];
    let h: number;
    if ((x & 0x7fffffff) > 0x7f800000) h = (x >>> 16) | 0x40;
    else h = ((x + 0x7fff + ((x >>> 16) & 1)) >>> 16) & 0xffff;
    out[2 * i] = h & 0xff;
    out[2 * i + 1] = h >>> 8;
  }
  return out;
}

/**
 * Checks a tensor's dtype (float32 or bfloat16) and shape against `shape` (a -1 entry takes the
 * tensor's own size and must be >= 1); returns its element count and element bytes.
 */
export function checkTensorHeader(dtype: DType, got: number[], field: string, shape: number[]): { n: number; elem: 2 | 4 } {
  if (dtype !== DType.D_TYPE_FLOAT32 && dtype !== DType.D_TYPE_BFLOAT16) {
    throw invalidArgument(`${field}.dtype`, `must be D_TYPE_FLOAT32 or D_TYPE_BFLOAT16, got ${DType[dtype] ?? dtype}`);
  }
  if (got.length !== shape.length || got.some((d, i) => (shape[i] === -1 ? d < 1 : d !== shape[i]))) {
    throw invalidArgument(`${field}.shape`, `expected ${fmt(shape.map((d) => (d === -1 ? "n" : d) as number))}, got ${fmt(got)}`);
  }
  return { n: got.reduce((a, b) => a * b, 1), elem: dtype === DType.D_TYPE_FLOAT32 ? 4 : 2 };
}

/** Rejects NaN and Inf (an engine given them would spread them through the session). */
export function checkFinite(data: Float32Array, field: string): void {
  for (let i = 0; i < data.length; i++) {
    const x = data[i];
    if (!Number.isFinite(x)) throw invalidArgument(field, `element ${i} is ${Number.isNaN(x) ? "NaN" : "Inf"}`);
  }
}

/**
 * Decodes `t` as a float32 array of exactly `shape` (a -1 entry takes the tensor's own size and
 * must be >= 1). Rejects other dtypes, wrong shapes, wrong byte lengths, NaN and Inf.
 */
export function readTensor(t: Tensor | undefined, field: string, shape: number[]): { data: Float32Array; shape: number[] } {
  if (!t) throw invalidArgument(field, "is required");
  const { n, elem } = checkTensorHeader(t.dtype, t.shape, field, shape);
  if (t.data.length !== n * elem) {
    throw invalidArgument(`${field}.data`, `expected ${n * elem} bytes for ${fmt(t.shape)} ${DType[t.dtype]}, got ${t.data.length}`);
  }
  let data: Float32Array;
  if (elem === 4) {
    // Copy: the wire buffer is not 4-byte aligned in general, and the engine keeps no views.
    data = new Float32Array(n);
    new Uint8Array(data.buffer).set(t.data);
  } else {
    data = bf16ToF32(t.data, n);
  }
  checkFinite(data, field);
  return { data, shape: [...t.shape] };
}

export function writeTensor(data: Float32Array, shape: number[], dtype: DType): Tensor {
  if (dtype === DType.D_TYPE_BFLOAT16) return { dtype, shape, data: Buffer.from(f32ToBf16(data)) };
  return { dtype: DType.D_TYPE_FLOAT32, shape, data: Buffer.from(data.buffer, data.byteOffset, data.byteLength) };
}
