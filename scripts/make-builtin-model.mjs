#!/usr/bin/env node
// Creates the built-in default model at models/builtin/ (or --out DIR): a tiny Llama-3-style
// Hugging Face folder with seeded random weights, so the service's first run downloads nothing.
// Everything is deterministic: the same files on every machine.
//
//   config.json             LlamaForCausalLM, 4 layers, hidden 128, 4 query / 2 KV heads of 64
//                           (a head dim the CUDA kernels take, so it also runs on FREEKV_BACKEND=cuda),
//                           Llama-3 rope scaling, 128K positions, untied LM head
//   model.safetensors       bf16 weights (normal draws scaled by 1/sqrt(fan_in), splitmix64 seed)
//   tokenizer.json          a real byte-level BPE tokenizer: 256 byte tokens + merges learned here
//                           from the English text below + 5 special tokens (Llama-3 names)
//   tokenizer_config.json   special tokens and a Llama-3-style chat template
//   generation_config.json  EOS ids
//
// The weights are random, so the text it generates is gibberish; it exercises every part of the
// runner. Point FREEKV_MODEL (or --model) at a real folder to serve a real model.
import { mkdirSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";

const args = process.argv.slice(2);
const outArg = args.indexOf("--out");
const here = new URL(".", import.meta.url).pathname;
const out = resolve(outArg >= 0 ? args[outArg + 1] : join(here, "..", "models", "builtin"));

const VOCAB = 512;
const SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"];
const MERGES = VOCAB - 256 - SPECIALS.length;
// --layers N: the same model with N layers (e.g. 32, the layer count of an 8B model, for
// measuring per-layer service costs on the CPU backend); the default folder always has 4.
const layersArg = args.indexOf("--layers");
const CFG = { hidden: 128, intermediate: 352, layers: layersArg >= 0 ? Number(args[layersArg + 1]) : 4, heads: 4, kvHeads: 2, headDim: 64 };
if (!Number.isInteger(CFG.layers) || CFG.layers < 1 || CFG.layers > 128) throw new RangeError(`--layers must be an integer in [1, 128], got ${args[layersArg + 1]}`);

// ---------------------------------------------------------------------------------------------
// Tokenizer: GPT-2 byte-level alphabet, BPE merges learned from a fixed text.

const CORPUS = `
The quick brown fox jumps over the lazy dog. A long context is a list of tokens the model has
already read; the keys and values of every token are kept so that the next token can attend to
them. When the context grows to many thousands of tokens, the cache no longer fits on the device,
and the pages that matter for the next step have to be found and brought back in time.
FreeKV keeps the first tokens of the sequence (the sink) and the most recent ones (the window)
on the device, and selects the pages in between whose summaries score highest against the current
query. It starts the recall of those pages for the next step while this step is still running,
and corrects the selection when the query has changed too much. The pages live in host memory in
a layout that makes each recall one contiguous copy per head.
This is a small model made for tests and for the first run of the service. It was not trained:
its weights are random numbers drawn from a seeded generator, and what it writes is not meant to
be read. Hello world! How are you today? I am fine, thank you. What is the time? It is ten past
nine in the morning, and the weather is cold and clear. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.
The service answers over gRPC; a gateway sends a prompt and receives the tokens as they are made.
`;

function bytesToUnicode() {
  const bs = [];
  for (let i = 33; i <= 126; i++) bs.push(i);
  for (let i = 161; i <= 172; i++) bs.push(i);
  for (let i = 174; i <= 255; i++) bs.push(i);
  const cs = [...bs];
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bs.includes(b)) {
      bs.push(b);
      cs.push(256 + n);
      n++;
    }
  }
  const map = new Map();
  bs.forEach((b, i) => map.set(b, String.fromCodePoint(cs[i])));
  return map;
}

// The GPT-2 pre-tokenizer split (the ByteLevel pre-tokenizer's default regex).
const SPLIT = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;

function learnMerges(text, count, b2u) {
  const words = new Map();
  for (const m of text.match(SPLIT) ?? []) {
    const sym = [...Buffer.from(m, "utf8")].map((b) => b2u.get(b));
    const key = sym.join(" ");
    words.set(key, (words.get(key) ?? 0) + 1);
  }
  let seqs = [...words.entries()].map(([k, c]) => ({ s: k.split(" "), c }));
  const merges = [];
  while (merges.length < count) {
    const pairs = new Map();
    for (const { s, c } of seqs) for (let i = 0; i + 1 < s.length; i++) {
      const p = s[i] + " " + s[i + 1];
      pairs.set(p, (pairs.get(p) ?? 0) + c);
    }
    if (pairs.size === 0) break;
    // Most frequent pair; ties broken by the pair's text so the result never depends on order.
    let best;
    let bestCount = -1;
    for (const [p, c] of pairs) if (c > bestCount || (c === bestCount && p < best)) {
      best = p;
      bestCount = c;
    }
    merges.push(best);
    const [a, b] = best.split(" ");
    seqs = seqs.map(({ s, c }) => {
      const o = [];
      for (let i = 0; i < s.length; i++) {
        if (i + 1 < s.length && s[i] === a && s[i + 1] === b) {
          o.push(a + b);
          i++;
        } else o.push(s[i]);
      }
      return { s: o, c };
    });
  }
  return merges;
}

function tokenizerJson() {
  const b2u = bytesToUnicode();
  const vocab = {};
  for (let b = 0; b < 256; b++) vocab[b2u.get(b)] = b;
  const merges = learnMerges(CORPUS, MERGES, b2u);
  if (merges.length !== MERGES) throw new Error(`corpus gave only ${merges.length} merges`);
  merges.forEach((m, i) => (vocab[m.replace(" ", "")] = 256 + i));
  const specialBase = 256 + MERGES;
  const added = SPECIALS.map((content, i) => ({ id: specialBase + i, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true }));
  const bos = SPECIALS[0];
  return {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: added,
    normalizer: null,
    pre_tokenizer: { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true },
    post_processor: {
      type: "TemplateProcessing",
      single: [{ SpecialToken: { id: bos, type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }],
      pair: [{ SpecialToken: { id: bos, type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }, { SpecialToken: { id: bos, type_id: 1 } }, { Sequence: { id: "B", type_id: 1 } }],
      special_tokens: { [bos]: { id: bos, ids: [specialBase], tokens: [bos] } },
    },
    decoder: { type: "ByteLevel", add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: { type: "BPE", dropout: null, unk_token: null, continuing_subword_prefix: null, end_of_word_suffix: null, fuse_unk: false, byte_fallback: false, ignore_merges: false, vocab, merges },
  };
}

const CHAT_TEMPLATE =
  "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n" +
  "{{ message['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";

// ---------------------------------------------------------------------------------------------
// Weights: splitmix64 -> Box-Muller normals, rounded to bf16.

let state = 0x4652454b56n; // "FREEKV"
function uniform() {
  state = BigInt.asUintN(64, state + 0x9e3779b97f4a7c15n);
  let z = state;
  z = BigInt.asUintN(64, (z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n);
  z = BigInt.asUintN(64, (z ^ (z >> 27n)) * 0x94d049bb133111ebn);
  z = z ^ (z >> 31n);
  return (Number(z >> 11n) + 0.5) / 2 ** 53;
}
function normals(n, std, mean = 0) {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i += 2) {
    const r = Math.sqrt(-2 * Math.log(uniform()));
    const t = 2 * Math.PI * uniform();
    a[i] = mean + std * r * Math.cos(t);
    if (i + 1 < n) a[i + 1] = mean + std * r * Math.sin(t);
  }
  return a;
}
function bf16(values) {
  const u = new Uint32Array(values.buffer, values.byteOffset, values.length);
  const o = new Uint16Array(values.length);
  for (let i = 0; i < values.length; i++) o[i] = (u[i] + 0x7fff + ((u[i] >>> 16) & 1)) >>> 16;
  return o;
}

function weights() {
  const { hidden: H, intermediate: I, layers, heads, kvHeads, headDim: D } = CFG;
  const t = {};
  const dense = (name, rows, cols, gain = 1) => (t[name] = { shape: [rows, cols], data: normals(rows * cols, gain / Math.sqrt(cols)) });
  const norm = (name) => (t[name] = { shape: [H], data: normals(H, 0.1, 1) });
  t["model.embed_tokens.weight"] = { shape: [VOCAB, H], data: normals(VOCAB * H, 1) };
  for (let l = 0; l < layers; l++) {
    const p = `model.layers.${l}.`;
    norm(p + "input_layernorm.weight");
    norm(p + "post_attention_layernorm.weight");
    dense(p + "self_attn.q_proj.weight", heads * D, H);
    dense(p + "self_attn.k_proj.weight", kvHeads * D, H);
    dense(p + "self_attn.v_proj.weight", kvHeads * D, H);
    dense(p + "self_attn.o_proj.weight", H, heads * D);
    dense(p + "mlp.gate_proj.weight", I, H);
    dense(p + "mlp.up_proj.weight", I, H);
    dense(p + "mlp.down_proj.weight", H, I);
  }
  norm("model.norm.weight");
  dense("lm_head.weight", VOCAB, H, 2);
  return t;
}

function writeSafetensors(file, tensors) {
  const names = Object.keys(tensors).sort();
  const header = { __metadata__: { format: "pt" } };
  let offset = 0;
  const blobs = [];
  for (const name of names) {
    const data = bf16(tensors[name].data);
    header[name] = { dtype: "BF16", shape: tensors[name].shape, data_offsets: [offset, offset + data.byteLength] };
    offset += data.byteLength;
    blobs.push(Buffer.from(data.buffer, data.byteOffset, data.byteLength));
  }
  let json = JSON.stringify(header);
  while ((8 + Buffer.byteLength(json)) % 8) json += " ";
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(Buffer.byteLength(json)));
  writeFileSync(file, Buffer.concat([len, Buffer.from(json), ...blobs]));
}

// ---------------------------------------------------------------------------------------------

mkdirSync(out, { recursive: true });
const specialBase = 256 + MERGES;
const ids = Object.fromEntries(SPECIALS.map((s, i) => [s, specialBase + i]));
const config = {
  architectures: ["LlamaForCausalLM"],
  model_type: "llama",
  vocab_size: VOCAB,
  hidden_size: CFG.hidden,
  intermediate_size: CFG.intermediate,
  num_hidden_layers: CFG.layers,
  num_attention_heads: CFG.heads,
  num_key_value_heads: CFG.kvHeads,
  head_dim: CFG.headDim,
  hidden_act: "silu",
  max_position_embeddings: 131072,
  rms_norm_eps: 1e-5,
  rope_theta: 500000.0,
  rope_scaling: { rope_type: "llama3", factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192 },
  tie_word_embeddings: false,
  attention_bias: false,
  mlp_bias: false,
  bos_token_id: ids["<|begin_of_text|>"],
  eos_token_id: [ids["<|end_of_text|>"], ids["<|eot_id|>"]],
  torch_dtype: "bfloat16",
};
writeFileSync(join(out, "config.json"), JSON.stringify(config, null, 2) + "\n");
writeFileSync(join(out, "generation_config.json"), JSON.stringify({ bos_token_id: config.bos_token_id, eos_token_id: config.eos_token_id }, null, 2) + "\n");
writeFileSync(join(out, "tokenizer.json"), JSON.stringify(tokenizerJson()) + "\n");
writeFileSync(
  join(out, "tokenizer_config.json"),
  JSON.stringify(
    {
      bos_token: "<|begin_of_text|>",
      eos_token: "<|eot_id|>",
      model_max_length: 131072,
      tokenizer_class: "PreTrainedTokenizerFast",
      chat_template: CHAT_TEMPLATE,
      added_tokens_decoder: Object.fromEntries(SPECIALS.map((s, i) => [String(specialBase + i), { content: s, special: true, lstrip: false, rstrip: false, normalized: false, single_word: false }])),
    },
    null,
    2,
  ) + "\n",
);
writeSafetensors(join(out, "model.safetensors"), weights());
console.log(`[builtin-model] wrote ${out} (LlamaForCausalLM, ${CFG.layers} layers, hidden ${CFG.hidden}, vocab ${VOCAB}, bf16)`);
