#!/usr/bin/env python3
"""Builds the tiny reference models of the model-runner golden tests and records what Hugging Face
transformers computes with them.

Two models, each saved as an ordinary Hugging Face folder (config.json + safetensors, fp32):
  tiny-llama3  LlamaForCausalLM: GQA (4 query heads, 2 KV heads), Llama-3 rope scaling with a
               small original context so every band of the scaling (kept, smoothed, divided) is
               exercised within 340 positions, untied LM head, weights sharded over several files
               (model.safetensors.index.json).
  tiny-qwen2   Qwen2ForCausalLM: q/k/v bias, tied embeddings, a single KV head, one safetensors file.

Weights are drawn from a seeded generator with scales chosen so that the logits spread over a few
units (the library's default init of std 0.02 gives near-uniform logits, where greedy decoding
would hinge on rounding). Next to each folder, golden.json holds:
  prompt            300 seeded token ids
  positions/logits  full-vocabulary logits at several prompt positions (one forward pass)
  continuation      40 greedy tokens (each step a full forward pass over prompt + tokens so far)
  decode_steps/decode_logits  logits of the last position at some continuation steps
  min_margin        smallest top-1 minus top-2 logit gap over the greedy steps
  inv_freq          the rotary frequencies transformers used (after rope scaling)
  hidden            per-layer hidden states at a few positions (for diagnosing a mismatch)

Run with PyTorch and transformers 5.x (fp32, CPU by default; TF32 is disabled on CUDA):
  cd scripts/goldens && python3 make_goldens.py --out ../../test/fixtures/models
"""
import argparse
import json
import math
import os
import sys
import traceback

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

PROMPT_TOKENS = 300
CONTINUATION = 40
POSITIONS = [0, 1, 2, 31, 32, 100, 177, 255, 299]
DECODE_STEPS = [0, 1, 10, 25, 39]
HIDDEN_POSITIONS = [0, 7, 299]


def rope_kwargs(theta, scaling):
    """Both spellings: transformers 5 reads rope_parameters, 4.x rope_theta + rope_scaling."""
    params = {"rope_type": scaling["rope_type"] if scaling else "default", "rope_theta": theta}
    if scaling:
        params.update({k: v for k, v in scaling.items() if k != "rope_type"})
    return {"rope_parameters": params}


def check_rope(config, want_type, want_theta):
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict):
        got_type = rp.get("rope_type", "default")
        got_theta = rp.get("rope_theta")
    else:
        rs = getattr(config, "rope_scaling", None) or {}
        got_type = rs.get("rope_type", rs.get("type", "default"))
        got_theta = getattr(config, "rope_theta", None)
    if got_type != want_type or (got_theta is not None and abs(float(got_theta) - want_theta) > 1e-6):
        raise SystemExit(f"config did not take the rope settings: type {got_type} theta {got_theta}")


def llama_config():
    scaling = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    cfg = LlamaConfig(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, **rope_kwargs(10000.0, scaling))
    check_rope(cfg, "llama3", 10000.0)
    return cfg


def qwen2_config():
    cfg = Qwen2Config(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=1024,
        rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, **rope_kwargs(1000000.0, None))
    check_rope(cfg, "default", 1000000.0)
    return cfg


def init_weights(model, seed, embed_std):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # shared (tied) parameters appear once
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(embed_std * torch.randn(p.shape, generator=g))
            elif p.dim() == 2:
                fan_in = p.shape[1]
                gain = 2.0 if name.startswith("lm_head") else 1.0
                p.copy_(gain / math.sqrt(fan_in) * torch.randn(p.shape, generator=g))
            else:
                raise SystemExit(f"unexpected parameter {name} {tuple(p.shape)}")


def rows(t):
    return [[float(x) for x in r] for r in t.double().cpu().tolist()]


def record(model, device, vocab, seed):
    g = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randint(3, vocab, (PROMPT_TOKENS,), generator=g).tolist()
    ids = torch.tensor([prompt], device=device)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, use_cache=False)
        logits = out.logits[0]
        hidden = {str(p): [[float(x) for x in h[0, p].double().cpu().tolist()] for h in out.hidden_states]
                  for p in HIDDEN_POSITIONS}
        seq = list(prompt)
        continuation, decode_logits, margins = [], [], []
        for step in range(CONTINUATION):
            last = model(torch.tensor([seq], device=device), use_cache=False).logits[0, -1]
            if step in DECODE_STEPS:
                decode_logits.append([float(x) for x in last.double().cpu().tolist()])
            top = torch.topk(last, 2).values
            margins.append(float(top[0] - top[1]))
            tok = int(torch.argmax(last))
            continuation.append(tok)
            seq.append(tok)
    rot = getattr(model.model, "rotary_emb", None)
    inv_freq = [float(x) for x in rot.inv_freq.double().cpu().tolist()] if rot is not None else []
    scaling = float(getattr(rot, "attention_scaling", 1.0)) if rot is not None else 1.0
    return {
        "prompt": prompt,
        "positions": POSITIONS,
        "logits": [[float(x) for x in logits[p].double().cpu().tolist()] for p in POSITIONS],
        "continuation": continuation,
        "decode_steps": DECODE_STEPS,
        "decode_logits": decode_logits,
        "min_margin": min(margins),
        "inv_freq": inv_freq,
        "attention_scaling": scaling,
        "hidden_positions": HIDDEN_POSITIONS,
        "hidden": hidden,
    }


def build(name, config, seed, embed_std, out_dir, device, shard):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    init_weights(model, seed, embed_std)
    model.eval().to(device)
    if isinstance(config, Qwen2Config):
        if model.model.layers[0].self_attn.q_proj.bias is None:
            raise SystemExit("qwen2 model has no q bias")
        if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
            raise SystemExit("qwen2 model is not tied")
    folder = os.path.join(out_dir, name)
    os.makedirs(folder, exist_ok=True)
    kwargs = {"safe_serialization": True}
    if shard:
        kwargs["max_shard_size"] = "200KB"
    model.to("cpu").save_pretrained(folder, **kwargs)
    model.to(device)
    golden = record(model, device, config.vocab_size, seed)
    golden.update({
        "model": name,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "device": str(device),
        "dtype": "float32",
    })
    with open(os.path.join(folder, "golden.json"), "w") as f:
        json.dump(golden, f)
    files = sorted(os.listdir(folder))
    size = sum(os.path.getsize(os.path.join(folder, x)) for x in files)
    print(f"{name}: {files} {size} bytes; min greedy margin {golden['min_margin']:.4f}; "
          f"continuation {golden['continuation'][:10]}...", flush=True)
    with open(os.path.join(folder, "config.json")) as f:
        print(f.read(), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    print(f"torch {torch.__version__} transformers {transformers.__version__}", flush=True)
    device = torch.device(args.device)
    failed = 0
    for name, make, seed, embed_std, shard in (("tiny-llama3", llama_config, 1234, 1.0, True),
                                               ("tiny-qwen2", qwen2_config, 4321, 0.5, False)):
        try:
            build(name, make(), seed, embed_std, args.out, device, shard)
        except BaseException:  # keep going: the other model's files are still worth having
            traceback.print_exc()
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
