/**
 * Fidelity traces (DESIGN.md section 6): one layer's post-RoPE queries, keys and values in a
 * safetensors file. q [T, Hq, D]; k, v [N+T, Hkv, D] (F32 or BF16; F16 is read too); metadata `prompt_len` (N)
 * and `name`. Replaying prefills tokens 0..N-1, then step t appends token N+t and attends with
 * q[t].
 *
 * Loading validates everything a replay relies on and throws TraceError naming the problem, so
 * a malformed file fails before any engine work starts.
 */
import { readSafetensorsHeader, readTensorF32, SafetensorsError, toBF16, writeSafetensors, type SafetensorsHeader } from "../../services/compute/model/safetensors.js";

/** The shape and the queries and keys of a trace: what its statistics need. */
export interface TraceShape {
  /** N: tokens prefilled before the first decode step. */
  promptLen: number;
  /** T: decode steps. */
  steps: number;
  qHeads: number;
  kvHeads: number;
  headDim: number;
  /** [T][Hq][D] */
  q: Float32Array;
  /** [N+T][Hkv][D] */
  k: Float32Array;
}

/** A named trace with its values: what a replay needs. */
export interface TraceTensors extends TraceShape {
  name: string;
  /** [N+T][Hkv][D] */
  v: Float32Array;
}

export interface Trace extends TraceTensors {
  /** Storage type of k in the file. */
  dtype: "F32" | "BF16" | "F16";
  /** Every metadata string of the file (synthesis parameters, generator facts). */
  metadata: Record<string, string>;
}

export class TraceError extends Error {
  constructor(file: string, message: string) {
    super(`${file}: ${message}`);
    this.name = "TraceError";
  }
}

const FLOAT_DTYPES = new Set(["F32", "BF16", "F16"]);

/** Reads and validates a trace. Throws TraceError for anything a replay cannot use. */
export function loadTrace(file: string): Trace {
  let header: SafetensorsHeader;
  try {
    header = readSafetensorsHeader(file);
  } catch (e) {
    if (e instanceof SafetensorsError) throw new TraceError(file, `not a readable safetensors file (${e.message.replace(`${file}: `, "")})`);
    const err = e as NodeJS.ErrnoException;
    throw new TraceError(file, err.code === "ENOENT" ? "no such file" : err.message);
  }
  const shape = (name: "q" | "k" | "v"): number[] => {
    const t = header.tensors.get(name);
    if (!t) throw new TraceError(file, `missing tensor '${name}' (a trace needs q [T,Hq,D], k and v [N+T,Hkv,D])`);
    if (!FLOAT_DTYPES.has(t.dtype)) throw new TraceError(file, `tensor '${name}' has dtype ${t.dtype}; expected F32, BF16 or F16`);
    if (t.shape.length !== 3) throw new TraceError(file, `tensor '${name}' has rank ${t.shape.length} (shape [${t.shape}]); expected rank 3`);
    if (t.shape.some((d) => d === 0)) throw new TraceError(file, `tensor '${name}' has an empty dimension (shape [${t.shape}])`);
    return t.shape;
  };
  const [T, Hq, Dq] = shape("q");
  const [NT, Hkv, Dk] = shape("k");
  const vs = shape("v");
  if (vs[0] !== NT || vs[1] !== Hkv || vs[2] !== Dk)
    throw new TraceError(file, `tensor 'v' has shape [${vs}] but 'k' has shape [${NT},${Hkv},${Dk}]; they must agree`);
  if (Dq !== Dk) throw new TraceError(file, `head dim disagrees: q has D=${Dq}, k has D=${Dk}`);
  if (Hq % Hkv !== 0) throw new TraceError(file, `q heads (${Hq}) must be a multiple of k/v heads (${Hkv})`);
  const raw = header.metadata.prompt_len;
  if (raw === undefined) throw new TraceError(file, "metadata 'prompt_len' is missing");
  const N = Number(raw);
  if (!/^\s*\d+\s*$/.test(String(raw)) || !Number.isSafeInteger(N) || N < 1)
    throw new TraceError(file, `metadata 'prompt_len' must be a positive integer (got '${raw}')`);
  if (N + T > NT)
    throw new TraceError(file, `metadata 'prompt_len' (${N}) is too large: k has ${NT} tokens, fewer than prompt_len + steps = ${N} + ${T}`);
  if (N + T !== NT)
    throw new TraceError(file, `k has ${NT} tokens but prompt_len + steps = ${N} + ${T} = ${N + T}; they must be equal`);
  const q = readTensorF32(header, "q");
  const k = readTensorF32(header, "k");
  const v = readTensorF32(header, "v");
  for (const [name, a] of [["q", q], ["k", k], ["v", v]] as const) {
    for (let i = 0; i < a.length; i++)
      if (!Number.isFinite(a[i])) throw new TraceError(file, `tensor '${name}' has a non-finite value at flat index ${i}`);
  }
  const dtype = header.tensors.get("k")!.dtype as Trace["dtype"];
  return {
    name: header.metadata.name ?? file,
    promptLen: N,
    steps: T,
    qHeads: Hq,
    kvHeads: Hkv,
    headDim: Dq,
    q,
    k,
    v,
    dtype,
    metadata: { ...header.metadata },
  };
}

/**
 * Writes a trace. With dtype BF16 the values are rounded to bfloat16 on disk; the in-memory
 * arrays are left as they are (reload the file to replay exactly what was stored).
 */
export function writeTrace(file: string, trace: Omit<Trace, "dtype" | "metadata">, dtype: "F32" | "BF16", metadata: Record<string, string> = {}): void {
  const { promptLen: N, steps: T, qHeads: Hq, kvHeads: Hkv, headDim: D } = trace;
  const enc = (a: Float32Array) => (dtype === "F32" ? { dtype, data: a } : { dtype, data: toBF16(a) });
  writeSafetensors(
    file,
    {
      q: { ...enc(trace.q), shape: [T, Hq, D] },
      k: { ...enc(trace.k), shape: [N + T, Hkv, D] },
      v: { ...enc(trace.v), shape: [N + T, Hkv, D] },
    },
    { ...metadata, prompt_len: String(N), name: trace.name },
  );
}
