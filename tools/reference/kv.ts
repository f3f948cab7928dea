/** Storage rounding of keys/values: float32 as given, or bfloat16 (round to nearest even). */
const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

export function toBF16(x: number): number {
  f32[0] = x;
  const u = u32[0];
  if ((u & 0x7fffffff) > 0x7f800000) return NaN;
  const r = (u + 0x7fff + ((u >>> 16) & 1)) >>> 0;
  u32[0] = (r >>> 16) << 16;
  return f32[0];
}

export function roundStored(a: Float32Array, dtype: "f32" | "bf16"): Float64Array {
  const out = new Float64Array(a.length);
  for (let i = 0; i < a.length; i++) out[i] = dtype === "bf16" ? toBF16(a[i]) : a[i];
  return out;
}

/** Directed rounding of a float32 value to bfloat16: toward +Infinity ("up") or -Infinity. */
export function bf16Directed(x: number, dir: "up" | "down"): number {
  f32[0] = x;
  const u = u32[0];
  if ((u & 0xffff) === 0 || (u & 0x7fffffff) > 0x7f800000) return f32[0];
  const negative = u >>> 31 === 1;
  const away = dir === "up" ? !negative : negative; // round the magnitude up
  u32[0] = (((u >>> 16) + (away ? 1 : 0)) << 16) >>> 0;
  return f32[0];
}
