/**
 * Rotary position embedding frequencies, with the scalings of the supported checkpoints. The
 * native forward pass takes these frequencies as they are, so this file is the one definition of
 * the scaling; it mirrors transformers' float32 arithmetic (Math.fround at each step) so that the
 * angles match the reference to the last bit or so.
 */
export interface RopeScaling {
  type: "llama3" | "linear";
  factor: number;
  lowFreqFactor?: number;
  highFreqFactor?: number;
  originalMaxPositionEmbeddings?: number;
}

const f = Math.fround;

/** inv_freq[i] = 1 / theta^(2i / headDim), then scaled; headDim / 2 values. */
export function ropeInvFreq(headDim: number, theta: number, scaling?: RopeScaling): Float32Array {
  if (!Number.isInteger(headDim) || headDim <= 0 || headDim % 2) throw new RangeError(`headDim must be a positive even integer, got ${headDim}`);
  if (!(theta > 0)) throw new RangeError(`rope theta must be > 0, got ${theta}`);
  const half = headDim / 2;
  const inv = new Float32Array(half);
  for (let i = 0; i < half; i++) inv[i] = f(1 / f(Math.pow(f(theta), f((2 * i) / headDim))));
  if (!scaling) return inv;
  if (!(scaling.factor > 0)) throw new RangeError(`rope scaling factor must be > 0, got ${scaling.factor}`);
  if (scaling.type === "linear") return inv.map((x) => f(x / scaling.factor));
  // Llama 3: keep high frequencies, divide low ones by the factor, interpolate in between.
  const low = scaling.lowFreqFactor ?? 1;
  const high = scaling.highFreqFactor ?? 4;
  const old = scaling.originalMaxPositionEmbeddings ?? 8192;
  if (!(high > low)) throw new RangeError(`rope scaling high_freq_factor (${high}) must exceed low_freq_factor (${low})`);
  const lowWavelen = old / low;
  const highWavelen = old / high;
  const out = new Float32Array(half);
  for (let i = 0; i < half; i++) {
    const wavelen = f((2 * Math.PI) / inv[i]);
    const scaled = wavelen > lowWavelen ? f(inv[i] / scaling.factor) : inv[i];
    if (wavelen < highWavelen || wavelen > lowWavelen) {
      out[i] = scaled;
    } else {
      const smooth = f((f(old / wavelen) - low) / (high - low));
      out[i] = f(f(f(f(1 - smooth) * scaled) / scaling.factor) + f(smooth * scaled));
    }
  }
  return out;
}
