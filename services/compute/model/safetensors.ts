/**
 * safetensors files: the header parser used by the model loader and the fidelity traces, and a
 * writer for the files the project makes itself (traces, the built-in model, test fixtures).
 *
 * Format: u64 little-endian header length N, then N bytes of JSON
 * `{ name: { dtype, shape, data_offsets: [begin, end] }, "__metadata__": { k: v } }`, then the
 * data; offsets are relative to the end of the header. Only the header is read here: tensor data
 * is read on demand (readTensor) or mapped natively by the model loader, never copied whole.
 */
import { closeSync, openSync, readSync, writeFileSync, fstatSync } from "node:fs";

export type SafetensorsDType = "F32" | "F16" | "BF16" | "F64" | "I64" | "I32" | "I16" | "I8" | "U8" | "BOOL";

export const DTYPE_BYTES: Record<SafetensorsDType, number> = { F64: 8, I64: 8, F32: 4, I32: 4, F16: 2, BF16: 2, I16: 2, I8: 1, U8: 1, BOOL: 1 };

export interface TensorInfo {
  name: string;
  dtype: SafetensorsDType;
  shape: number[];
  /** Absolute byte offset of the data in the file. */
  offset: number;
  byteLength: number;
}

export interface SafetensorsHeader {
  file: string;
  tensors: Map<string, TensorInfo>;
  metadata: Record<string, string>;
}

export class SafetensorsError extends Error {
  constructor(file: string, message: string) {
    super(`${file}: ${message}`);
    this.name = "SafetensorsError";
  }
}

const MAX_HEADER = 100 * 1024 * 1024;

/** Reads and validates the header of a safetensors file. */
export function readSafetensorsHeader(file: string): SafetensorsHeader {
  const fd = openSync(file, "r");
  try {
    const size = fstatSync(fd).size;
    if (size < 8) throw new SafetensorsError(file, "too short to be a safetensors file");
    const lenBuf = Buffer.alloc(8);
    readSync(fd, lenBuf, 0, 8, 0);
    const n = Number(lenBuf.readBigUInt64LE(0));
    if (n <= 0 || n > MAX_HEADER || 8 + n > size) throw new SafetensorsError(file, `bad header length ${n}`);
    const hdr = Buffer.alloc(n);
    readSync(fd, hdr, 0, n, 8);
    let json: Record<string, unknown>;
    try {
      json = JSON.parse(hdr.toString("utf8"));
    } catch (e) {
      throw new SafetensorsError(file, `header is not JSON (${(e as Error).message})`);
    }
    if (json === null || typeof json !== "object" || Array.isArray(json)) throw new SafetensorsError(file, "header is not a JSON object");
    const base = 8 + n;
    const tensors = new Map<string, TensorInfo>();
    let metadata: Record<string, string> = {};
    for (const [name, raw] of Object.entries(json)) {
      if (name === "__metadata__") {
        metadata = (raw ?? {}) as Record<string, string>;
        continue;
      }
      const t = raw as { dtype?: string; shape?: unknown; data_offsets?: unknown };
      if (!t || typeof t.dtype !== "string" || !Object.hasOwn(DTYPE_BYTES, t.dtype))
        throw new SafetensorsError(file, `tensor '${name}' has unsupported dtype ${String(t?.dtype)}`);
      if (!Array.isArray(t.shape) || !t.shape.every((d) => Number.isInteger(d) && d >= 0))
        throw new SafetensorsError(file, `tensor '${name}' has a bad shape`);
      const off = t.data_offsets as number[];
      if (!Array.isArray(off) || off.length !== 2 || !off.every((o) => Number.isSafeInteger(o) && o >= 0) || !(off[0] <= off[1]))
        throw new SafetensorsError(file, `tensor '${name}' has bad data_offsets`);
      const dtype = t.dtype as SafetensorsDType;
      const count = (t.shape as number[]).reduce((a, b) => a * b, 1);
      const byteLength = off[1] - off[0];
      if (byteLength !== count * DTYPE_BYTES[dtype])
        throw new SafetensorsError(file, `tensor '${name}': ${byteLength} bytes for shape [${t.shape}] of ${dtype}`);
      if (base + off[1] > size) throw new SafetensorsError(file, `tensor '${name}' runs past the end of the file`);
      tensors.set(name, { name, dtype, shape: t.shape as number[], offset: base + off[0], byteLength });
    }
    // Tensors may not share bytes (the format lays them out one after another): each would become
    // its own float copy, so aliases of one region would multiply the memory a small file takes.
    const spans = [...tensors.values()].filter((t) => t.byteLength > 0).sort((a, b) => a.offset - b.offset);
    for (let i = 1; i < spans.length; i++)
      if (spans[i].offset < spans[i - 1].offset + spans[i - 1].byteLength)
        throw new SafetensorsError(file, `tensors '${spans[i - 1].name}' and '${spans[i].name}' overlap in the file (data_offsets)`);
    return { file, tensors, metadata };
  } finally {
    closeSync(fd);
  }
}

/** Reads one tensor and converts it to float32 (F32, F16, BF16) or float64 (F64 kept as is). */
export function readTensorF32(header: SafetensorsHeader, name: string): Float32Array {
  const t = header.tensors.get(name);
  if (!t) throw new SafetensorsError(header.file, `no tensor named '${name}'`);
  const buf = Buffer.alloc(t.byteLength);
  const fd = openSync(header.file, "r");
  try {
    readSync(fd, buf, 0, t.byteLength, t.offset);
  } finally {
    closeSync(fd);
  }
  const n = t.byteLength / DTYPE_BYTES[t.dtype];
  const out = new Float32Array(n);
  switch (t.dtype) {
    case "F32":
      for (let i = 0; i < n; i++) out[i] = buf.readFloatLE(i * 4);
      break;
    case "F64":
      for (let i = 0; i < n; i++) out[i] = buf.readDoubleLE(i * 8);
      break;
    case "BF16": {
      const u = new Uint32Array(1);
      const f = new Float32Array(u.buffer);
      for (let i = 0; i < n; i++) {
        u[0] = buf.readUInt16LE(i * 2) << 16;
        out[i] = f[0];
      }
      break;
    }
    case "F16":
      for (let i = 0; i < n; i++) out[i] = halfToFloat(buf.readUInt16LE(i * 2));
      break;
    default:
      throw new SafetensorsError(header.file, `tensor '${name}' is ${t.dtype}, not a float type`);
  }
  return out;
}

export function halfToFloat(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return s * m * 2 ** -24;
  if (e === 31) return m ? NaN : s * Infinity;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}

/** Rounds float32 values to bfloat16 (round to nearest even) and returns the raw 16-bit words. */
export function toBF16(values: Float32Array): Uint16Array {
  const u = new Uint32Array(values.buffer, values.byteOffset, values.length);
  const out = new Uint16Array(values.length);
  for (let i = 0; i < values.length; i++) {
    const x = u[i];
    if ((x & 0x7f800000) === 0x7f800000 && x & 0x7fffff) out[i] = (x >>> 16) | 0x40;
    else out[i] = (x + 0x7fff + ((x >>> 16) & 1)) >>> 16;
  }
  return out;
}

export interface TensorToWrite {
  dtype: "F32" | "BF16" | "F16" | "I32" | "I64";
  shape: number[];
  /** F32: Float32Array; BF16/F16: Uint16Array of raw words; I32: Int32Array; I64: BigInt64Array. */
  data: Float32Array | Uint16Array | Int32Array | BigInt64Array;
}

/** Writes a safetensors file (tensors in name order, 8-byte aligned header). */
export function writeSafetensors(file: string, tensors: Record<string, TensorToWrite>, metadata: Record<string, string> = {}): void {
  const names = Object.keys(tensors).sort();
  const header: Record<string, unknown> = {};
  if (Object.keys(metadata).length) header.__metadata__ = metadata;
  let offset = 0;
  for (const name of names) {
    const t = tensors[name];
    const count = t.shape.reduce((a, b) => a * b, 1);
    if (count !== t.data.length) throw new Error(`tensor '${name}': shape [${t.shape}] has ${count} elements, data has ${t.data.length}`);
    const bytes = t.data.byteLength;
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  while ((8 + Buffer.byteLength(json)) % 8 !== 0) json += " ";
  const hdr = Buffer.from(json, "utf8");
  const out = Buffer.alloc(8 + hdr.length + offset);
  out.writeBigUInt64LE(BigInt(hdr.length), 0);
  hdr.copy(out, 8);
  let p = 8 + hdr.length;
  for (const name of names) {
    const d = tensors[name].data;
    Buffer.from(d.buffer, d.byteOffset, d.byteLength).copy(out, p);
    p += d.byteLength;
  }
  writeFileSync(file, out);
}
