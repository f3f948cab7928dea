/** A golden model's transformers outputs (scripts/goldens/make_goldens.py, run on the GPU machine). */
export interface Golden {
  prompt: number[];
  positions: number[];
  logits: number[][];
  continuation: number[];
  decode_steps: number[];
  decode_logits: number[][];
  inv_freq: number[];
  min_margin: number;
}
