/**
 * The model folder loader and the native Model's input checks: both config.json spellings,
 * unknown architectures, missing and mis-shaped tensors, BF16 and F16 weights (equal to F32
 * weights holding the same rounded values), shards, the built-in model's tokenizer and chat
 * template, and errors (never crashes) for bad tokens, positions and batches.
 */
import { copyFileSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { execFileSync } from "node:child_process";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { loadAddon } from "../../native/binding.js";
import { parseModelConfig } from "../../services/compute/model/config.js";
import { loadModel, loadModelAsync, readModelFolder } from "../../services/compute/model/loader.js";
import { ropeInvFreq } from "../../services/compute/model/rope.js";
import { readSafetensorsHeader, readTensorF32, toBF16, writeSafetensors, type TensorToWrite } from "../../services/compute/model/safetensors.js";

const FIXTURES = join(import.meta.dirname, "..", "fixtures", "models");
const QWEN = join(FIXTURES, "tiny-qwen2");
const LLAMA = join(FIXTURES, "tiny-llama3");
const dirs: string[] = [];
afterAll(() => dirs.forEach((d) => rmSync(d, { recursive: true, force: true })));

function copyFolder(src: string): string {
  const dir = mkdtempSync(join(tmpdir(), "freekv-loader-"));
  dirs.push(dir);
  for (const f of readdirSync(src)) copyFileSync(join(src, f), join(dir, f));
  return dir;
}

function editConfig(dir: string, edit: (c: Record<string, unknown>) => void): void {
  const c = JSON.parse(readFileSync(join(dir, "config.json"), "utf8"));
  edit(c);
  writeFileSync(join(dir, "config.json"), JSON.stringify(c));
}

/** Rewrites model.safetensors of a single-file folder with each tensor transformed. */
function rewriteWeights(dir: string, fn: (name: string, data: Float32Array, shape: number[]) => TensorToWrite | undefined): void {
  const h = readSafetensorsHeader(join(dir, "model.safetensors"));
  const out: Record<string, TensorToWrite> = {};
  for (const t of h.tensors.values()) {
    const r = fn(t.name, readTensorF32(h, t.name), t.shape);
    if (r) out[t.name] = r;
  }
  writeSafetensors(join(dir, "model.safetensors"), out);
}

const bf16ToF32 = (w: Uint16Array) => new Float32Array(new Uint32Array(Array.from(w, (x) => x << 16)).buffer);

/** float32 -> IEEE half, round to nearest even (for values in the normal half range). */
function toF16(values: Float32Array): Uint16Array {
  const out = new Uint16Array(values.length);
  const f = new Float32Array(1);
  const u = new Uint32Array(f.buffer);
  for (let i = 0; i < values.length; i++) {
    f[0] = values[i];
    const x = u[0];
    const sign = (x >>> 16) & 0x8000;
    const exp = ((x >>> 23) & 0xff) - 127 + 15;
    let mant = x & 0x7fffff;
    if (exp <= 0) {
      out[i] = sign;
      continue;
    }
    let h = sign | (exp << 10) | (mant >>> 13);
    mant &= 0x1fff;
    if (mant > 0x1000 || (mant === 0x1000 && h & 1)) h++;
    out[i] = h;
  }
  return out;
}
function f16ToF32(w: Uint16Array): Float32Array {
  return Float32Array.from(w, (h) => {
    const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    return e === 0 ? s * m * 2 ** -24 : s * (1 + m / 1024) * 2 ** (e - 15);
  });
}

async function promptLogits(dir: string): Promise<Float32Array> {
  const { model } = loadModel(dir);
  return model.prefill(1, Int32Array.from([5, 17, 200, 3, 99, 42, 7, 150]), 0, true);
}

describe("config.json", () => {
  it("reads transformers 4 and 5 spellings of the same Llama-3 rope the same way", () => {
    const v5 = JSON.parse(readFileSync(join(LLAMA, "config.json"), "utf8"));
    const { rope_parameters: rp, dtype, ...rest } = v5;
    const { rope_theta, rope_type, ...scaling } = rp;
    const v4 = { ...rest, torch_dtype: dtype, rope_theta, rope_scaling: { type: rope_type, ...scaling } };
    const a = parseModelConfig(v5), b = parseModelConfig(v4);
    expect(b.native.ropeScaling).toEqual(a.native.ropeScaling);
    expect(Array.from(b.native.ropeInvFreq)).toEqual(Array.from(a.native.ropeInvFreq));
    expect(a.dtype).toBe("float32");
    expect(b.dtype).toBe("float32");
    expect(a.native.ropeScaling?.type).toBe("llama3");
  });

  it("computes linear scaling as the unscaled frequencies over the factor", () => {
    const plain = ropeInvFreq(16, 10000);
    const lin = ropeInvFreq(16, 10000, { type: "linear", factor: 4 });
    plain.forEach((x, i) => expect(lin[i]).toBeCloseTo(x / 4, 12));
  });

  it("names an unknown architecture and unsupported settings", () => {
    const base = JSON.parse(readFileSync(join(QWEN, "config.json"), "utf8"));
    expect(() => parseModelConfig({ ...base, architectures: ["GPT2LMHeadModel"] })).toThrow(/unknown architecture 'GPT2LMHeadModel'.*LlamaForCausalLM/);
    expect(() => parseModelConfig({ ...base, architectures: undefined })).toThrow(/architectures is missing/);
    expect(() => parseModelConfig({ ...base, num_key_value_heads: 3 })).toThrow(/num_key_value_heads/);
    expect(() => parseModelConfig({ ...base, hidden_act: "gelu" })).toThrow(/hidden_act 'gelu'/);
    expect(() => parseModelConfig({ ...base, rope_parameters: { rope_type: "yarn", rope_theta: 1e4, factor: 2 } })).toThrow(/rope type 'yarn'/);
    expect(() => parseModelConfig({ ...base, vocab_size: -4 })).toThrow(/vocab_size/);
  });

  it("says when a sliding window is not applied", () => {
    const base = JSON.parse(readFileSync(join(LLAMA, "config.json"), "utf8"));
    const m = parseModelConfig({ ...base, architectures: ["MistralForCausalLM"], sliding_window: 128 });
    expect(m.notes.join(" ")).toMatch(/sliding_window 128 is not applied/);
    expect(parseModelConfig({ ...base, architectures: ["MistralForCausalLM"], sliding_window: null }).notes).toEqual([]);
    const q = JSON.parse(readFileSync(join(QWEN, "config.json"), "utf8"));
    expect(parseModelConfig({ ...q, sliding_window: 64 }).notes).toEqual([]); // use_sliding_window false
  });

  it("reads the EOS ids from generation_config.json, then config.json", () => {
    const base = JSON.parse(readFileSync(join(QWEN, "config.json"), "utf8"));
    expect(parseModelConfig(base).eosTokenIds).toEqual([2]);
    expect(parseModelConfig(base, { eos_token_id: [7, 9] }).eosTokenIds).toEqual([7, 9]);
  });
});

describe("weights", () => {
  it("finds the shards of an index and rejects a shard that is missing", () => {
    const f = readModelFolder(LLAMA);
    expect(new Set(f.tensors.map((t) => t.file.split("/").pop())).size).toBe(3);
    const dir = copyFolder(LLAMA);
    rmSync(join(dir, "model-00002-of-00003.safetensors"));
    expect(() => readModelFolder(dir)).toThrow(/model-00002-of-00003.safetensors/);
    // Shard names that are not plain file names: a number, the folder itself, its parent.
    for (const bad of [7, "", "..", "."]) {
      const d = copyFolder(LLAMA);
      const index = JSON.parse(readFileSync(join(d, "model.safetensors.index.json"), "utf8"));
      index.weight_map[Object.keys(index.weight_map)[0]] = bad;
      writeFileSync(join(d, "model.safetensors.index.json"), JSON.stringify(index));
      expect(() => readModelFolder(d), JSON.stringify(bad)).toThrow(/must be a plain file name/);
    }
  });

  it("names a missing tensor and a mis-shaped one", () => {
    const dir = copyFolder(QWEN);
    rewriteWeights(dir, (name, data, shape) => (name === "model.layers.1.self_attn.k_proj.bias" ? undefined : { dtype: "F32", shape, data }));
    expect(() => readModelFolder(dir)).toThrow(/missing tensor 'model.layers.1.self_attn.k_proj.bias'/);
    const dir2 = copyFolder(QWEN);
    rewriteWeights(dir2, (name, data, shape) =>
      name === "model.layers.0.mlp.up_proj.weight" ? { dtype: "F32", shape: [shape[1], shape[0]], data } : { dtype: "F32", shape, data },
    );
    expect(() => readModelFolder(dir2)).toThrow(/'model.layers.0.mlp.up_proj.weight' has shape \[64,96\], expected \[96,64\]/);
  });

  it("the native Model checks the tensors itself too (bypassing the loader)", () => {
    const f = readModelFolder(QWEN);
    const { Model } = loadAddon();
    const bad = f.tensors.map((t) => (t.name === "model.norm.weight" ? { ...t, shape: [63] } : t));
    expect(() => new Model({ config: f.spec.native, tensors: bad })).toThrow(/model.norm.weight/);
    const missing = f.tensors.filter((t) => t.name !== "model.layers.0.self_attn.o_proj.weight");
    expect(() => new Model({ config: f.spec.native, tensors: missing })).toThrow(/missing tensor 'model.layers.0.self_attn.o_proj.weight'/);
    const past = f.tensors.map((t) => (t.name === "model.norm.weight" ? { ...t, offset: 1e9 } : t));
    expect(() => new Model({ config: f.spec.native, tensors: past })).toThrow(/runs past the end/);
    expect(() => new Model({ config: { ...f.spec.native, architecture: "gpt2" }, tensors: f.tensors })).toThrow(/architecture 'gpt2'/);
    expect(() => new Model({ config: { ...f.spec.native, ropeInvFreq: [1, 2] }, tensors: f.tensors })).toThrow(/ropeInvFreq/);
  });

  it("BF16 weights give exactly the logits of F32 weights holding the same rounded values", async () => {
    const bf = copyFolder(QWEN), ref = copyFolder(QWEN);
    rewriteWeights(bf, (_n, data, shape) => ({ dtype: "BF16", shape, data: toBF16(data) }));
    rewriteWeights(ref, (_n, data, shape) => ({ dtype: "F32", shape, data: bf16ToF32(toBF16(data)) }));
    expect(readModelFolder(bf).tensors.every((t) => t.dtype === "BF16")).toBe(true);
    expect(Array.from(await promptLogits(bf))).toEqual(Array.from(await promptLogits(ref)));
    // and they differ from the unrounded model (the rounding is real)
    const orig = await promptLogits(QWEN);
    expect(Array.from(orig)).not.toEqual(Array.from(await promptLogits(ref)));
  });

  it("F16 weights give exactly the logits of F32 weights holding the same rounded values", async () => {
    const h = copyFolder(QWEN), ref = copyFolder(QWEN);
    rewriteWeights(h, (_n, data, shape) => ({ dtype: "F16", shape, data: toF16(data) }));
    rewriteWeights(ref, (_n, data, shape) => ({ dtype: "F32", shape, data: f16ToF32(toF16(data)) }));
    expect(Array.from(await promptLogits(h))).toEqual(Array.from(await promptLogits(ref)));
  });
});

describe("Model.load (off the event loop)", () => {
  it("gives the same model as the constructor and rejects bad tensors by name", async () => {
    const a = await promptLogits(LLAMA);
    const { model } = await loadModelAsync(LLAMA);
    const b = await model.prefill(1, Int32Array.from([5, 17, 200, 3, 99, 42, 7, 150]), 0, true);
    expect(Array.from(b)).toEqual(Array.from(a));
    const f = readModelFolder(QWEN);
    const bad = f.tensors.map((t) => (t.name === "model.layers.1.mlp.down_proj.weight" ? { ...t, offset: 1e9 } : t));
    await expect(loadAddon().Model.load({ config: f.spec.native, tensors: bad })).rejects.toThrow(/model.layers.1.mlp.down_proj.weight/);
    expect(() => loadAddon().Model.load({ config: f.spec.native, tensors: f.tensors, engine: {} as never })).toThrow(/expected an Engine/);
  });
});

describe("the native Model refuses bad calls without crashing", () => {
  it("tokens out of range, a wrong start position, duplicate sessions, wrong types", async () => {
    const { model } = loadModel(QWEN);
    await expect(model.prefill(1, Int32Array.of(1, 320, 2), 0, false)).rejects.toThrow(/tokens\[1\] = 320 is out of range \[0, 320\)/);
    await expect(model.prefill(1, Int32Array.of(1, -1), 0, false)).rejects.toThrow(/tokens\[1\] = -1/);
    await model.prefill(1, Int32Array.of(1, 2, 3), 0, false);
    await expect(model.prefill(1, Int32Array.of(4), 7, false)).rejects.toThrow(/startPosition 7 does not match the session's context of 3 tokens/);
    await model.prefill(2, Int32Array.of(1, 2, 3), 0, false);
    await expect(model.decode(Int32Array.of(1, 1), Int32Array.of(4, 5), Int32Array.of(3, 3))).rejects.toThrow(/appears twice/);
    await expect(model.decode(Int32Array.of(1, 2), Int32Array.of(4, 5), Int32Array.of(3, 9))).rejects.toThrow(/positions\[1\] = 9/);
    expect(() => model.prefill(1, [1, 2] as unknown as Int32Array, 3, false)).toThrow(/tokens must be an Int32Array/);
    expect(() => model.decode(Int32Array.of(1), Int32Array.of(4, 5), Int32Array.of(3))).toThrow(/same length/);
    expect(() => model.prefill(1, new Int32Array(0), 3, false)).toThrow(/must not be empty/);
    // The sessions are intact: session 1 still continues at position 3.
    const l = await model.decode(Int32Array.of(1, 2), Int32Array.of(4, 5), Int32Array.of(3, 3));
    expect(l.length).toBe(2 * 320);
  });
});

describe("the built-in model", () => {
  const dir = mkdtempSync(join(tmpdir(), "freekv-builtin-"));
  dirs.push(dir);
  execFileSync(process.execPath, [join(import.meta.dirname, "..", "..", "scripts", "make-builtin-model.mjs"), "--out", dir]);

  it("is a Llama-3 style folder with bf16 weights, a byte-level BPE tokenizer and a chat template", async () => {
    const f = readModelFolder(dir);
    expect(f.spec.architectureName).toBe("LlamaForCausalLM");
    expect(f.spec.native.ropeScaling?.type).toBe("llama3");
    expect(f.tensors.every((t) => t.dtype === "BF16")).toBe(true);
    const codec = f.codec!;
    const text = "Hello world! The pages of a long context, 1000 tokens: ünïcödé ✓";
    const ids = codec.encode(text);
    expect(ids.length).toBeLessThan(Buffer.byteLength(text)); // merges are used
    expect(ids.every((t) => t >= 0 && t < f.spec.native.vocabSize)).toBe(true);
    expect(codec.decode(ids)).toBe(text);
    expect(codec.encode(text, true)[0]).toBe(f.spec.bosTokenId);
    const chat = codec.encodeChat([{ role: "user", content: "Hi" }]);
    expect(chat[0]).toBe(f.spec.bosTokenId);
    expect(codec.decode(chat, false)).toBe("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
    const { model } = loadModel(dir);
    const logits = await model.prefill(1, Int32Array.from(chat), 0, false);
    expect(logits.every(Number.isFinite)).toBe(true);
  });

  it("is made deterministically", () => {
    const again = mkdtempSync(join(tmpdir(), "freekv-builtin-"));
    dirs.push(again);
    execFileSync(process.execPath, [join(import.meta.dirname, "..", "..", "scripts", "make-builtin-model.mjs"), "--out", again]);
    for (const f of readdirSync(dir)) expect(readFileSync(join(again, f)).equals(readFileSync(join(dir, f)))).toBe(true);
  });
});

describe("a model folder that would load and then misbehave is refused, naming what is wrong", () => {
  const builtin = () => copyFolder(join(import.meta.dirname, "..", "..", "models", "builtin"));

  /** Rewrites the header of a single-file folder's weights (the data bytes kept as they are). */
  function editHeader(dir: string, edit: (h: Record<string, { dtype: string; shape: number[]; data_offsets: number[] }>) => unknown): void {
    const file = join(dir, "model.safetensors");
    const buf = readFileSync(file);
    const n = Number(buf.readBigUInt64LE(0));
    const header = JSON.parse(buf.subarray(8, 8 + n).toString("utf8"));
    const replaced = edit(header);
    let json = JSON.stringify(replaced === undefined ? header : replaced);
    while (Buffer.byteLength(json) < n) json += " ";
    if (Buffer.byteLength(json) !== n) throw new Error("the edited header must not grow");
    writeFileSync(file, Buffer.concat([buf.subarray(0, 8), Buffer.from(json), buf.subarray(8 + n)]));
  }

  it("tensors that share bytes in the file (each would be its own copy in memory)", () => {
    const dir = builtin();
    editHeader(dir, (h) => {
      const names = Object.keys(h).filter((k) => k.endsWith("post_attention_layernorm.weight"));
      const a = h[names[0]], b = h[names[1]];
      b.data_offsets = [...a.data_offsets];
    });
    expect(() => readModelFolder(dir)).toThrow(/overlap in the file/);
  });

  it("a header that is not an object, and a dtype named like an Object property", () => {
    const dir = builtin();
    editHeader(dir, () => null);
    expect(() => readModelFolder(dir)).toThrow(/header is not a JSON object/);
    const dir2 = builtin();
    editHeader(dir2, (h) => {
      h[Object.keys(h).find((k) => k !== "__metadata__")!].dtype = "toString";
    });
    expect(() => readModelFolder(dir2)).toThrow(/unsupported dtype toString/);
  });

  it("rotary frequencies that are not positive finite float32s, and rms_norm_eps out of (0, 1)", () => {
    const cases: Array<[(c: Record<string, unknown>) => void, RegExp]> = [
      [(c) => (c.rope_theta = 1e-40), /rope_theta must be > 1/],
      [(c) => (c.rope_theta = 1e300), /rotary frequency 1 = 0/],
      [(c) => (c.rope_scaling = { rope_type: "linear", factor: 1e-40 }), /linear scaling .* gives rotary frequency 0 = Infinity/],
      [(c) => (c.rms_norm_eps = 1e39), /rms_norm_eps must be in \(0, 1\)/],
      [(c) => (c.rms_norm_eps = 1e-50), /rms_norm_eps must be in \(0, 1\) and representable/],
    ];
    for (const [edit, want] of cases) {
      const dir = builtin();
      editConfig(dir, edit);
      expect(() => readModelFolder(dir), String(want)).toThrow(want);
    }
  });

  it("token ids outside vocab_size: the tokenizer's, BOS and EOS", () => {
    const small = builtin();
    editConfig(small, (c) => (c.vocab_size = 256));
    expect(() => readModelFolder(small)).toThrow(/tokenizer\.json has token id 511, outside config\.json's vocab_size 256/);
    const eos = builtin();
    editConfig(eos, (c) => (c.eos_token_id = [508, 600]));
    writeFileSync(join(eos, "generation_config.json"), JSON.stringify({ eos_token_id: [508, 600] }));
    expect(() => readModelFolder(eos)).toThrow(/eos_token_id 600 is outside/);
  });

  it("reads the chat template from chat_template.jinja and from a list of named templates", () => {
    const ref = readModelFolder(builtin()).codec!;
    const messages = [{ role: "user", content: "Where is the needle?" }];
    const want = ref.encodeChat(messages);
    const cfgOf = (dir: string) => JSON.parse(readFileSync(join(dir, "tokenizer_config.json"), "utf8"));
    const listed = builtin();
    const c = cfgOf(listed);
    c.chat_template = [{ name: "tool_use", template: "{{ 'other' }}" }, { name: "default", template: c.chat_template }];
    writeFileSync(join(listed, "tokenizer_config.json"), JSON.stringify(c));
    expect(readModelFolder(listed).codec!.encodeChat(messages)).toEqual(want);
    const jinja = builtin();
    const c2 = cfgOf(jinja);
    writeFileSync(join(jinja, "chat_template.jinja"), c2.chat_template);
    delete c2.chat_template;
    writeFileSync(join(jinja, "tokenizer_config.json"), JSON.stringify(c2));
    expect(readModelFolder(jinja).codec!.encodeChat(messages)).toEqual(want);
    const bad = builtin();
    const c3 = cfgOf(bad);
    c3.chat_template = 42;
    writeFileSync(join(bad, "tokenizer_config.json"), JSON.stringify(c3));
    expect(() => readModelFolder(bad)).toThrow(/chat_template must be a string or a list/);
  });
});
