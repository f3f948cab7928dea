"""What users run today: HF transformers decoding a Llama-3.1-8B-shaped model, ms per decode step.

A LlamaForCausalLM is built from a LlamaConfig with random bf16 weights (nothing is downloaded),
its KV cache is filled with random bf16 keys and values for the context length (the decode step
costs the same whatever the cached values are, and a 128K prefill would only spend device time),
and single-token decode steps are timed with the cache on the GPU (DynamicCache) and with
transformers' offloaded cache (DynamicCache(offloading=True): layers live on the CPU and are
prefetched one layer ahead). Each step is synchronised and timed on the host; the median is kept.

Usage: python3 bench/anchor/hf_anchor.py --out anchor.json [--cases 32768x1,32768x4,131072x1]
                                         [--prefill 32768,131072 [--prefill-only]]
--prefill also times the prefill of prompts of those lengths (the time to first token of
transformers' generate(): one forward pass with the cache on the GPU, last position's logits).
DESIGN.md section 3 gives the figures measured before (ms/step, GPU cache / offloaded):
32K b1 26.3 / 243, 32K b4 91.4 / 1237, 128K b1 66.8 / 362.
"""

import argparse
import json
import statistics
import sys
import time

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

PREVIOUS = {"32768x1": (26.3, 243.0), "32768x4": (91.4, 1237.0), "131072x1": (66.8, 362.0)}


LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=128)
TINY = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64)  # --tiny: a dry run of this script on a CPU


def build_model(shape, device):
    cfg = LlamaConfig(**shape, max_position_embeddings=131072 + 1024, rms_norm_eps=1e-5, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.eval()
    with torch.no_grad():  # random weights with a sane scale (never zeros)
        for p in model.parameters():
            if p.dim() >= 2:
                p.uniform_(-0.02, 0.02)
            else:
                p.uniform_(0.9, 1.1)
    return cfg, model


def make_cache(cfg, batch, ctx, offloading, device):
    cache = DynamicCache(config=cfg, offloading=offloading) if offloading else DynamicCache(config=cfg)
    g = torch.Generator(device=device).manual_seed(batch * 1000003 + ctx)
    shape = (batch, cfg.num_key_value_heads, ctx, cfg.head_dim)
    for layer in range(cfg.num_hidden_layers):
        k = torch.empty(shape, dtype=torch.bfloat16, device=device).uniform_(-1, 1, generator=g)
        v = torch.empty(shape, dtype=torch.bfloat16, device=device).uniform_(-1, 1, generator=g)
        cache.update(k, v, layer)
        del k, v
    sync(device)
    return cache


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def profile_step(model, cfg, batch, ctx, device):
    """Where one decode step's time goes (CPU vs GPU, top operators): explains a slow anchor."""
    from torch.profiler import ProfilerActivity, profile

    cache = make_cache(cfg, batch, ctx, False, device)
    tok = torch.randint(0, cfg.vocab_size, (batch, 1), device=device)
    for i in range(2):
        model(input_ids=tok, past_key_values=cache, cache_position=torch.tensor([ctx + i], device=device),
              use_cache=True, logits_to_keep=1)
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        model(input_ids=tok, past_key_values=cache, cache_position=torch.tensor([ctx + 2], device=device),
              use_cache=True, logits_to_keep=1)
        sync(device)
    out = {}
    ka = prof.key_averages()
    for key in ("self_cpu_time_total", "self_device_time_total", "self_cuda_time_total"):
        try:
            out[key] = ka.table(sort_by=key, row_limit=12)
        except Exception:  # noqa: BLE001 - the sort keys differ between torch versions
            pass
    del cache
    return out


@torch.no_grad()
def time_decode(model, cfg, batch, ctx, offloading, steps, warmup, device):
    cache = make_cache(cfg, batch, ctx, offloading, device)
    tok = torch.randint(0, cfg.vocab_size, (batch, 1), device=device)
    times = []
    for i in range(warmup + steps):
        pos = torch.tensor([ctx + i], device=device)
        sync(device)
        t = time.perf_counter()
        out = model(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1:].argmax(-1)
        sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - t) * 1e3)
        del out
    tokens_after = int(cache.get_seq_length())
    if tokens_after != ctx + warmup + steps:
        raise RuntimeError(f"cache holds {tokens_after} tokens, expected {ctx + warmup + steps}")
    del cache
    if device == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times), times, tokens_after


@torch.no_grad()
def time_prefill(model, cfg, length, device):
    """One prompt of `length` random tokens through the model (cache on the GPU, logits of the last
    position only), as transformers' generate() prefills before its first token; after a short
    warm-up prompt. Returns milliseconds."""
    g = torch.Generator(device=device).manual_seed(length)
    warm = torch.randint(0, cfg.vocab_size, (1, 256), device=device, generator=g)
    model(input_ids=warm, past_key_values=DynamicCache(config=cfg), use_cache=True, logits_to_keep=1)
    ids = torch.randint(0, cfg.vocab_size, (1, length), device=device, generator=g)
    cache = DynamicCache(config=cfg)
    sync(device)
    t = time.perf_counter()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    out.logits[:, -1].argmax(-1).item()
    ms = (time.perf_counter() - t) * 1e3
    if int(cache.get_seq_length()) != length:
        raise RuntimeError(f"cache holds {cache.get_seq_length()} tokens, expected {length}")
    del out, cache
    if device == "cuda":
        torch.cuda.empty_cache()
    return ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default="32768x1,32768x4,131072x1")
    ap.add_argument("--deadline-s", type=float, default=0.0)
    ap.add_argument("--tiny", action="store_true", help="dry run: tiny model on the CPU")
    ap.add_argument("--prefill", default="", help="prompt lengths whose prefill (time to first token) is timed first")
    ap.add_argument("--prefill-only", action="store_true", help="time the prefill lengths only (no decode cases)")
    args = ap.parse_args()
    t0 = time.time()
    device = "cpu" if args.tiny else "cuda"
    res = {
        "what": "HF transformers decode step, Llama-3.1-8B shapes, random bf16 weights, sdpa attention",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run)",
        "cases": [],
    }

    def save():
        res["wall_s"] = time.time() - t0
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)

    try:
        cfg, model = build_model(TINY if args.tiny else LLAMA_31_8B, device)
    except Exception as e:  # noqa: BLE001 - the report must say why the anchor is missing
        res["error"] = f"model build failed: {e!r}"
        save()
        return 1
    print(f"[anchor] model built in {time.time() - t0:.1f} s", flush=True)
    res["param_dtype"] = str(next(model.parameters()).dtype)
    res["attn_implementation"] = str(getattr(model.config, "_attn_implementation", "?"))
    res["params"] = sum(p.numel() for p in model.parameters())
    res["prefill"] = []
    for length in [int(x) for x in args.prefill.split(",") if x]:
        if args.deadline_s and time.time() - t0 > args.deadline_s:
            res["prefill"].append({"tokens": length, "skipped": "out of time"})
            continue
        try:
            ms = time_prefill(model, cfg, length, device)
            res["prefill"].append({"tokens": length, "ms": ms, "tokens_per_s": length / ms * 1e3})
            print(f"[anchor] prefill {length} tokens: {ms:.0f} ms", flush=True)
        except Exception as e:  # noqa: BLE001
            if device == "cuda":
                torch.cuda.empty_cache()
            res["prefill"].append({"tokens": length, "error": repr(e)[:500]})
            print(f"[anchor] prefill {length} tokens: FAILED {e!r}", flush=True)
        save()
    for case in ([] if args.prefill_only else args.cases.split(",")):
        ctx, batch = (int(x) for x in case.split("x"))
        for offloading in (False, True):
            mode = "offloaded" if offloading else "gpu"
            if args.deadline_s and time.time() - t0 > args.deadline_s:
                res["cases"].append({"context": ctx, "batch": batch, "cache": mode, "skipped": "out of time"})
                continue
            steps, warmup = (2, 1) if offloading else (6, 2)
            try:
                med, times, tokens_after = time_decode(model, cfg, batch, ctx, offloading, steps, warmup, device)
                prev = PREVIOUS.get(case, (None, None))[1 if offloading else 0]
                res["cases"].append({"context": ctx, "batch": batch, "cache": mode, "ms_per_step": med,
                                     "all_ms": times, "cache_tokens_after": tokens_after,
                                     "previously_measured_ms": prev})
                print(f"[anchor] ctx {ctx} batch {batch} {mode}: {med:.1f} ms/step (before: {prev})", flush=True)
            except Exception as e:  # noqa: BLE001
                if device == "cuda":
                    torch.cuda.empty_cache()
                res["cases"].append({"context": ctx, "batch": batch, "cache": mode, "error": repr(e)[:500]})
                print(f"[anchor] ctx {ctx} batch {batch} {mode}: FAILED {e!r}", flush=True)
            save()
    if not args.prefill_only and not (args.deadline_s and time.time() - t0 > args.deadline_s):
        try:
            ctx, batch = (int(x) for x in args.cases.split(",")[0].split("x"))
            res["profile_gpu_cache_first_case"] = profile_step(model, cfg, batch, ctx, device)
            print(res["profile_gpu_cache_first_case"].get("self_cpu_time_total", "")[:3000], flush=True)
        except Exception as e:  # noqa: BLE001
            res["profile_error"] = repr(e)[:500]
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
