/** The Attention stream's client (tools/client/attention-stream.ts) and tensor helpers for the tests. */
import { DType, type Tensor } from "../../proto/gen/freekv/v1/common.js";

export { AttentionStream } from "../../tools/client/attention-stream.js";

export function f32Tensor(data: Float32Array, shape: number[]): Tensor {
  return { dtype: DType.D_TYPE_FLOAT32, shape, data: Buffer.from(data.buffer, data.byteOffset, data.byteLength) };
}

/** bf16 by truncation-free round-to-nearest-even, written independently of the service's codec. */
export function toBf16(data: Float32Array): { bytes: Buffer; rounded: Float32Array } {
  const bytes = Buffer.alloc(data.length * 2);
  const rounded = new Float32Array(data.length);
  const f = new Float32Array(1);
  const u = new Uint32Array(f.buffer);
  for (let i = 0; i < data.length; i++) {
    f[0] = data[i];
    const lsb = (u[0] >>> 16) & 1;
    const hi = ((u[0] + 0x7fff + lsb) >>> 16) & 0xffff;
    bytes.writeUInt16LE(hi, 2 * i);
    u[0] = hi << 16;
    rounded[i] = f[0];
  }
  return { bytes, rounded };
}

export function tensorToF32(t: Tensor): Float32Array {
  if (t.dtype === DType.D_TYPE_FLOAT32) {
    const out = new Float32Array(t.data.length / 4);
    new Uint8Array(out.buffer).set(t.data);
    return out;
  }
  const out = new Float32Array(t.data.length / 2);
  const u = new Uint32Array(out.buffer);
  for (let i = 0; i < out.length; i++) u[i] = t.data.readUInt16LE(2 * i) << 16;
  return out;
}
