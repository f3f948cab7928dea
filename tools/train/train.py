"""Trains a small Llama-architecture long-context model on filler text and synthetic retrieval tasks.

    python3 tools/train/train.py --corpus corpus.txt --tasks-js dist/tools/tasks/main.js \
        --out OUT_DIR --minutes 7 [--tokenizer DIR] [--resume DIR_OR_CKPT] [--ckpt-out FILE]

Steps: tokenizer (trained here unless --tokenizer gives one), chars-per-token of the corpus, the
model (LlamaForCausalLM, random init), training for a wall-clock budget with a length curriculum
(stages by fraction of the budget), saving the Hugging Face folder, then a greedy-decoding accuracy
check per task family and length. Tasks come from the TypeScript generator, run with node as a
subprocess streaming JSONL, so the task formats have one definition.

OUT_DIR gets exactly: model.safetensors, config.json, generation_config.json, tokenizer.json,
tokenizer_config.json, training_curve.json, eval.json, RECIPE.md.
"""
import argparse
import copy
import json
import math
import os
import queue
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import tokenizer as toklib  # noqa: E402

FAMILIES = ["single_needle", "multi_key", "multi_value", "multi_query", "variable_tracking", "ordered_retrieval"]


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--tasks-js", required=True, help="dist/tools/tasks/main.js")
    ap.add_argument("--node", default="node")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", help="folder with tokenizer.json (+ tokenizer_config.json); trained here when absent")
    ap.add_argument("--minutes", type=float, default=6.5, help="wall-clock budget of the training loop")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--rope-theta", type=float, default=500000.0)
    ap.add_argument("--max-positions", type=int, default=32768)
    ap.add_argument("--stages", default="1024:0.2,4096:0.3,16384:0.5", help="seq_len:fraction of the budget, in order")
    ap.add_argument("--tokens-per-step", type=int, default=131072)
    ap.add_argument("--task-frac", type=float, default=0.85, help="share of sequences packed with tasks (the rest: plain corpus text)")
    # 3 producers kept the H200 waiting 69 s of a 390 s run (models/retrieval-8m, training_curve.json data_wait_s):
    # the GPU machine has 16 cores, so 8 by default.
    ap.add_argument("--data-workers", type=int, default=8, help="producer processes per stage (each runs node and the tokenizer)")
    ap.add_argument("--answer-weight", type=float, default=4.0, help="loss weight of the answer tokens (others 1)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--eval-lengths", default="4096,16384")
    ap.add_argument("--eval-per-family", type=int, default=6)
    ap.add_argument("--eval-seconds", type=float, default=75.0, help="cap on the accuracy check (split evenly over the lengths)")
    ap.add_argument("--total-minutes", type=float, default=0, help="cap on the whole command: the accuracy check is shortened to end 20 s before it (0: none)")
    ap.add_argument("--resume", help="a checkpoint file from --ckpt-out (weights + optimizer) or a saved model folder (weights)")
    ap.add_argument("--ckpt-out", help="also write a full checkpoint (fp32 weights, optimizer, step) here")
    ap.add_argument("--device", default=None)
    ap.add_argument("--attn", default=None, help="sdpa (default on torch >= 2.1) or eager")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--tokenizer-only", action="store_true", help="train the tokenizer into --out and stop")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps too (smoke tests)")
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Data


def node_tasks(a, seed, count, context_tokens, cpt, families=None, depths=None, start=0):
    """Popen of the TypeScript generator writing JSONL to stdout."""
    cmd = [a.node, a.tasks_js, "--corpus", a.corpus, "--seed", str(seed), "--count", str(count), "--start", str(start),
           "--context-tokens", context_tokens, "--chars-per-token", f"{cpt:.4f}", "--families", families or a.families, "--out", "-"]
    if depths:
        cmd += ["--depths", depths]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=sys.stderr, text=True, bufsize=1 << 20)


class Corpus:
    """The corpus as one token array, for plain-text sequences and to fill the end of task packs."""

    def __init__(self, tok, path):
        import numpy as np
        with open(path, encoding="utf-8") as f:
            lines = [l for l in f.read().split("\n") if l]
        chunks = ["\n".join(lines[i:i + 64]) + "\n" for i in range(0, len(lines), 64)]
        ids = []
        for enc in tok.encode_batch(chunks, add_special_tokens=False):
            ids.extend(enc.ids)
        self.ids = np.asarray(ids, dtype=np.int32)
        self.chars = sum(len(c) for c in chunks)

    def window(self, rng, n):
        s = rng.randrange(0, max(1, len(self.ids) - n))
        return self.ids[s:s + n]


class Producer:
    """Makes batches [B, L] of token ids and per-token loss weights for one curriculum stage, in a
    process of its own (spawned, so the training loop never waits on its Python work)."""

    def __init__(self, a, tok_file, corpus_ids, ids, stage, seq_len, cpt):
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        self.q = ctx.Queue(maxsize=6)
        self.stop_ev = ctx.Event()
        self.used = ctx.Value("q", 0)
        self.dropped = ctx.Value("q", 0)
        self.procs = [ctx.Process(target=produce, args=(vars(a), tok_file, corpus_ids, ids, stage, w, seq_len, cpt, self.q, self.stop_ev, self.used, self.dropped), daemon=True)
                      for w in range(a.data_workers)]
        self.started = False
        self.stopped = False

    def start(self):
        for p in self.procs:
            p.start()
        self.started = True

    def get(self):
        while True:
            try:
                return self.q.get(timeout=60)
            except queue.Empty:
                if not any(p.is_alive() for p in self.procs):
                    raise RuntimeError(f"data producers exited with codes {[p.exitcode for p in self.procs]}")

    @property
    def tasks_used(self):
        return self.used.value

    @property
    def tasks_dropped(self):
        return self.dropped.value

    def close(self):
        self.stopped = True
        self.stop_ev.set()
        if self.started:
            for p in self.procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.terminate()


def produce(adict, tok_file, corpus_ids, ids, stage, worker, seq_len, cpt, q, stop_ev, used, dropped):
    import numpy as np
    from tokenizers import Tokenizer
    a = argparse.Namespace(**adict)
    tok = Tokenizer.from_file(tok_file)
    rng = random.Random(a.seed * 1000 + stage + 7919 * worker)
    L = seq_len
    batch = max(1, a.tokens_per_step // L)
    bos, eos = ids[toklib.BOS], ids[toklib.EOS]
    procs = []

    def encode(tasks):
        P = tok.encode_batch([t["prompt"] for t in tasks], add_special_tokens=False)
        T = tok.encode_batch([t["target"] for t in tasks], add_special_tokens=False)
        for p, t in zip(P, T):
            x = np.asarray([bos] + p.ids + t.ids + [eos], dtype=np.int32)
            if len(x) > L:
                with dropped.get_lock():
                    dropped.value += 1
                continue
            w = np.ones(len(x), dtype=np.float32)
            w[len(x) - len(t.ids) - 1:] = a.answer_weight  # answer tokens and EOS
            with used.get_lock():
                used.value += 1
            yield x, w

    def examples():
        """Endless (ids, weights) of tasks: BOS prompt target EOS, answer tokens weighted."""
        lo, hi = max(64, L // 16), int(L * 0.9)
        seed = a.seed * 1000 + 17 * stage + 1 + 7919 * worker
        start, n = 0, 1000000
        while not stop_ev.is_set():
            proc = node_tasks(a, seed, n, f"{lo}:{hi}", cpt, start=start)
            procs.append(proc)
            start += n
            buf, chars = [], 0
            for line in proc.stdout:
                t = json.loads(line)
                buf.append(t)
                chars += len(t["prompt"])
                if chars >= 2_000_000 or len(buf) >= 1024:  # big batches keep the tokenizer's threads busy
                    yield from encode(buf)
                    buf, chars = [], 0
                    if stop_ev.is_set():
                        break
            if buf:
                yield from encode(buf)
            proc.kill()
            proc.wait()

    ex_iter = examples()
    pending = None
    try:
        while not stop_ev.is_set():
            X = np.zeros((batch, L), dtype=np.int32)
            W = np.zeros((batch, L), dtype=np.float32)
            for b in range(batch):
                n = 0
                if rng.random() < a.task_frac:
                    while True:
                        ex = pending if pending is not None else next(ex_iter)
                        pending = None
                        if n + len(ex[0]) > L:
                            pending = ex
                            break
                        X[b, n:n + len(ex[0])] = ex[0]
                        W[b, n:n + len(ex[0])] = ex[1]
                        n += len(ex[0])
                if n < L:  # the rest of the row: plain text after a BOS
                    X[b, n] = bos
                    s0 = rng.randrange(0, max(1, len(corpus_ids) - L))
                    X[b, n + 1:] = corpus_ids[s0:s0 + L - n - 1]
                    W[b, n:] = 1.0
            while not stop_ev.is_set():
                try:
                    q.put((X, W), timeout=0.5)
                    break
                except queue.Full:
                    pass
    except StopIteration:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        q.cancel_join_thread()


# ---------------------------------------------------------------------------------------------
# Model


def build_model(a, vocab_size, ids, torch, device):
    from transformers import LlamaConfig, LlamaForCausalLM
    attn = a.attn or ("sdpa" if hasattr(torch.nn.functional, "scaled_dot_product_attention") else "eager")
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=a.head_dim,
        hidden_act="silu",
        max_position_embeddings=a.max_positions,
        rms_norm_eps=1e-5,
        rope_theta=a.rope_theta,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=ids[toklib.BOS],
        eos_token_id=ids[toklib.EOS],
        pad_token_id=ids[toklib.EOS],
        use_cache=True,
    )
    # transformers 5 reads rope settings from rope_parameters; 4 from rope_theta.
    if getattr(cfg, "rope_parameters", None) is not None and isinstance(cfg.rope_parameters, dict):
        cfg.rope_parameters["rope_theta"] = a.rope_theta
    cfg._attn_implementation = attn
    torch.manual_seed(a.seed)
    model = LlamaForCausalLM(cfg)
    return model.to(device), attn


def lr_at(a, step, frac):
    warm = min(1.0, (step + 1) / max(1, a.warmup_steps))
    cos = a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return a.lr * warm * cos


def save_folder(model, tok_dir, out, torch):
    """The Hugging Face folder in bf16 (config, generation config, weights, tokenizer files)."""
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        for f in ["model.safetensors", "config.json", "generation_config.json"]:
            if os.path.exists(os.path.join(tmp, f)):
                shutil.copy(os.path.join(tmp, f), os.path.join(out, f))
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        if os.path.abspath(os.path.join(tok_dir, f)) != os.path.abspath(os.path.join(out, f)):
            shutil.copy(os.path.join(tok_dir, f), os.path.join(out, f))


def fix_generation_config(out, ids):
    p = os.path.join(out, "generation_config.json")
    g = json.load(open(p)) if os.path.exists(p) else {}
    g.update({"bos_token_id": ids[toklib.BOS], "eos_token_id": [ids[toklib.EOS], ids[toklib.EOT]], "pad_token_id": ids[toklib.EOS], "do_sample": False})
    with open(p, "w") as f:
        json.dump(g, f, indent=2)
        f.write("\n")


# ---------------------------------------------------------------------------------------------
# Evaluation


def score(answer, output):
    """Every expected string in the output, in order (the TypeScript scoreOutput)."""
    pos, in_order, hits = 0, True, 0
    for s in answer:
        hits += s in output
        j = output.find(s, pos)
        if j < 0:
            in_order = False
        else:
            pos = j + len(s)
    return hits, in_order


def evaluate(a, model, tok, ids, cpt, torch, device, seconds):
    model.eval()
    results = {"lengths": {}, "examples": []}
    lengths = [int(x) for x in a.eval_lengths.split(",") if x]
    fams = a.families.split(",")
    eos = {ids[toklib.EOS], ids[toklib.EOT]}
    for li, L in enumerate(lengths):
        deadline = time.time() + seconds / len(lengths)
        count = a.eval_per_family * len(fams)
        # Same target length for every task; depths on a grid; seeds never used in training.
        proc = node_tasks(a, 900000 + L, count, str(int(L * 0.97)), cpt, depths="0.05,0.35,0.65,0.95")
        tasks = [json.loads(l) for l in proc.stdout]
        proc.wait()
        per = {f: {"n": 0, "exact": 0, "hits": 0, "answers": 0, "tokens": []} for f in fams}
        for t in tasks:
            if time.time() > deadline:
                break
            x = [ids[toklib.BOS]] + tok.encode(t["prompt"], add_special_tokens=False).ids
            inp = torch.tensor([x], device=device)
            with torch.no_grad(), torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda")):
                out = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=t["max_tokens"], do_sample=False,
                                     eos_token_id=list(eos), pad_token_id=ids[toklib.EOS])
            gen = [i for i in out[0, len(x):].tolist() if i not in eos]
            text = tok.decode(gen)
            hits, ok = score(t["answer"], text)
            r = per[t["family"]]
            r["n"] += 1
            r["exact"] += int(ok)
            r["hits"] += hits
            r["answers"] += len(t["answer"])
            r["tokens"].append(len(x))
            results["examples"].append({"id": t["id"], "length": L, "depth": t["depth"], "ok": ok, "answer": t["answer"], "output": text[:300]})
        summary = {}
        for f, r in per.items():
            if r["n"]:
                summary[f] = {"n": r["n"], "accuracy": round(r["exact"] / r["n"], 3), "answer_recall": round(r["hits"] / max(1, r["answers"]), 3),
                              "mean_prompt_tokens": round(sum(r["tokens"]) / len(r["tokens"]))}
        results["lengths"][str(L)] = summary
        for f, s in summary.items():
            log(f"eval L={L} {f}: accuracy {s['accuracy']} recall {s['answer_recall']} (n={s['n']}, ~{s['mean_prompt_tokens']} tokens)")
    model.train()
    return results


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    a = parse_args(argv)
    t_start = time.time()
    from tokenizers import Tokenizer

    os.makedirs(a.out, exist_ok=True)

    # Tokenizer
    tok_dir = a.tokenizer
    if not tok_dir or not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        tok_dir = a.out
        t0 = time.time()
        proc = node_tasks(a, 424242, 600, "300:1200", 3.8)
        extra = [json.loads(l) for l in proc.stdout]
        proc.wait()
        texts = list(toklib.corpus_texts(a.corpus)) + [t["prompt"] + t["target"] for t in extra]
        toklib.train_tokenizer(texts, a.vocab, tok_dir, a.max_positions)
        log(f"tokenizer trained: vocab {a.vocab} in {time.time() - t0:.1f}s")
    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    ids = toklib.special_ids(tok)
    vocab = tok.get_vocab_size()
    if a.tokenizer_only:
        return

    import numpy as np
    import torch

    random.seed(a.seed)
    np.random.seed(a.seed)
    torch.manual_seed(a.seed)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    t0 = time.time()
    corpus = Corpus(tok, a.corpus)
    corpus_cpt = corpus.chars / len(corpus.ids)
    # Task prompts have more tokens per character than prose (digits are single tokens): the
    # generator is given the chars/token measured on a sample of its own output.
    proc = node_tasks(a, 515151, 60, "2000", corpus_cpt)
    sample = [json.loads(l)["prompt"] for l in proc.stdout]
    proc.wait()
    cpt = sum(len(s) for s in sample) / sum(len(e.ids) for e in tok.encode_batch(sample, add_special_tokens=False))
    log(f"corpus: {len(corpus.ids)} tokens, {corpus_cpt:.3f} chars/token; tasks {cpt:.3f} chars/token ({time.time() - t0:.1f}s)")

    model, attn = build_model(a, vocab, ids, torch, device)
    nparams = sum(p.numel() for p in model.parameters())
    log(f"model: {nparams / 1e6:.2f}M parameters, attention {attn}, device {device}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt_kw = {"fused": True} if device.startswith("cuda") else {}
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8, **opt_kw)

    step, tokens_seen, prior_seconds, resumed = 0, 0, 0.0, None
    prev_longest = 0  # the longest sequences the resumed model was trained on (0: unknown)
    if a.resume:
        if os.path.isdir(a.resume):
            from safetensors.torch import load_file
            sd = load_file(os.path.join(a.resume, "model.safetensors"))
            missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
            resumed = {"from": a.resume, "kind": "weights", "missing": missing}
            curve_file = os.path.join(a.resume, "training_curve.json")
            if os.path.exists(curve_file):
                prev = json.load(open(curve_file))
                step, tokens_seen, prior_seconds = prev.get("steps", 0), prev.get("tokens", 0), prev.get("train_seconds", 0.0)
                prev_longest = max((c.get("seq_len", 0) for c in prev.get("curve", [])), default=0)
        else:
            ck = torch.load(a.resume, map_location=device, weights_only=False)
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            step, tokens_seen, prior_seconds = ck["step"], ck["tokens"], ck["train_seconds"]
            resumed = {"from": a.resume, "kind": "checkpoint"}
        log(f"resumed from {a.resume} at step {step}, {tokens_seen} tokens")

    fwd = torch.compile(model) if a.compile else model

    stages = []
    acc = 0.0
    for s in a.stages.split(","):
        L, f = s.split(":")
        acc += float(f)
        stages.append((int(L), acc))
    stages = [(L, e / acc) for L, e in stages]
    producers = [Producer(a, os.path.join(tok_dir, "tokenizer.json"), corpus.ids, ids, i, L, cpt) for i, (L, _) in enumerate(stages)]

    def start_producers(upto):  # the current stage and the next one
        for p in producers[:upto + 2]:
            if not p.started and not p.stopped:
                p.start()

    budget = a.minutes * 60.0
    curve = []
    train_start = time.time()
    last_log, wait_s, stage_i, stage_steps = train_start, 0.0, 0, 0
    # A continued run skips the stages shorter than the longest sequences its model already saw (all
    # but the last stage when that is unknown), so `--resume DIR --stages 16384:0.4,32768:0.6` extends
    # a 16K model to 32K while still training on 16K first.
    first_stage = 0
    if resumed:
        first_stage = len(stages) - 1
        if prev_longest:
            first_stage = next((i for i, (L, _) in enumerate(stages) if L >= prev_longest), len(stages) - 1)
    start_producers(first_stage)
    model.train()
    dev_type = device.split(":")[0]
    win_loss, win_ans, win_n = 0.0, 0.0, 0
    while True:
        elapsed = time.time() - train_start
        frac = elapsed / budget
        if frac >= 1.0 or (a.max_steps and stage_steps >= a.max_steps):
            break
        si = max(first_stage, next(i for i, (_, e) in enumerate(stages) if frac < e or i == len(stages) - 1))
        if si != stage_i:
            for p in producers[:si]:
                p.close()
            start_producers(si)
            log(f"stage {si}: sequences of {stages[si][0]} tokens")
            save_folder(model, tok_dir, a.out, torch)  # something usable even if the run is cut short
            stage_i = si
        tw = time.time()
        X, W = producers[si].get()
        X = torch.from_numpy(X).long()
        W = torch.from_numpy(W)
        if dev_type == "cuda":
            X, W = X.pin_memory(), W.pin_memory()
        wait_s += time.time() - tw
        X = X.to(device, non_blocking=True)
        W = W.to(device, non_blocking=True)
        lr = lr_at(a, stage_steps, frac)  # warm-up counted in this run (a resumed run warms its optimizer up again)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device_type=dev_type, dtype=torch.bfloat16, enabled=dev_type == "cuda"):
            logits = fwd(input_ids=X).logits
        lp = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), X[:, 1:].reshape(-1), reduction="none")
        w = W[:, 1:].reshape(-1)
        loss = (lp * w).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        stage_steps += 1
        tokens_seen += X.numel()
        ans = w > 1.0
        win_loss += loss.item()
        win_ans += (lp[ans].mean().item() if ans.any() else float("nan"))
        win_n += 1
        if step % a.log_every == 0:
            now = time.time()
            rec = {"step": step, "tokens": tokens_seen, "seq_len": stages[si][0], "loss": round(win_loss / win_n, 4), "answer_loss": round(win_ans / win_n, 4),
                   "lr": lr, "grad_norm": round(float(gn), 3), "seconds": round(prior_seconds + now - train_start, 1),
                   "tokens_per_s": round(a.log_every * X.numel() / (now - last_log)), "data_wait_s": round(wait_s, 1)}
            curve.append(rec)
            log(json.dumps(rec))
            last_log, win_loss, win_ans, win_n = now, 0.0, 0.0, 0
    train_seconds = time.time() - train_start
    for p in producers:
        p.close()
    log(f"trained {step} steps, {tokens_seen} tokens in {train_seconds:.1f}s")

    save_folder(model, tok_dir, a.out, torch)
    fix_generation_config(a.out, ids)
    if a.ckpt_out:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "tokens": tokens_seen,
                    "train_seconds": prior_seconds + train_seconds, "args": vars(a)}, a.ckpt_out)
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    info = {"steps": step, "tokens": tokens_seen, "train_seconds": round(prior_seconds + train_seconds, 1), "this_run_train_seconds": round(train_seconds, 1),
            "gpu_minutes": round((time.time() - t_start) / 60, 2), "device": gpu, "parameters": nparams, "chars_per_token": round(cpt, 4), "corpus_chars_per_token": round(corpus_cpt, 4),
            "tasks_used": sum(p.tasks_used for p in producers), "tasks_dropped_too_long": sum(p.tasks_dropped for p in producers),
            "resumed": resumed, "args": vars(a), "curve": curve}
    by_len = {}
    for r in curve[1:]:
        by_len.setdefault(r["seq_len"], []).append(r["tokens_per_s"])
    info["tokens_per_s_by_len"] = {str(L): round(sorted(v)[len(v) // 2]) for L, v in by_len.items()}
    with open(os.path.join(a.out, "training_curve.json"), "w") as f:
        json.dump(info, f, indent=1)
    write_recipe(a, info, None)

    # Accuracy check, on the bf16 weights as saved.
    model.to(torch.bfloat16)
    eval_s = a.eval_seconds
    if a.total_minutes:
        eval_s = max(0.0, min(eval_s, a.total_minutes * 60 - (time.time() - t_start) - 20))
    t_eval = time.time()
    ev = evaluate(a, model, tok, ids, cpt, torch, device, eval_s)
    ev["seconds"] = round(time.time() - t_eval, 1)
    with open(os.path.join(a.out, "eval.json"), "w") as f:
        json.dump(ev, f, indent=1)
    info["gpu_minutes"] = round((time.time() - t_start) / 60, 2)
    with open(os.path.join(a.out, "training_curve.json"), "w") as f:
        json.dump(info, f, indent=1)
    write_recipe(a, info, ev)
    log(f"done in {(time.time() - t_start) / 60:.2f} min -> {a.out}")


def write_recipe(a, info, ev):
    last = info["curve"][-1] if info["curve"] else {}
    lines = [
        "# Recipe of this model",
        "",
        "A small Llama-architecture model trained from scratch by `tools/train/train.py` on filler text from the",
        "machine's English documentation (`tools/train/corpus.mjs`) and synthetic long-context retrieval tasks",
        "(`tools/tasks`, six RULER-style families). Nothing was downloaded.",
        "",
        f"* architecture: LlamaForCausalLM, {a.layers} layers, hidden {a.hidden}, {a.heads} query / {a.kv_heads} KV heads of {a.head_dim}, "
        f"MLP {a.intermediate}, vocab {a.vocab} (byte-level BPE, digits split), tied embeddings, RoPE theta {a.rope_theta:g}, "
        f"{info['parameters'] / 1e6:.2f}M parameters, saved in bf16",
        f"* seed {a.seed}; curriculum (sequence length: end of stage as a fraction of the budget) {a.stages}; "
        f"{a.tokens_per_step} tokens per step; task share {a.task_frac}; answer-token loss weight {a.answer_weight}",
        f"* AdamW (0.9, 0.95), peak lr {a.lr}, {a.warmup_steps} warm-up steps, cosine over the wall-clock budget to {a.min_lr_frac} x peak, "
        f"weight decay {a.weight_decay}, gradient clip 1.0, bf16 autocast",
        "* expected speed (the default configuration on one H200, bf16 autocast, SDPA, batches of 131072 tokens, measured with random "
        "tokens): about 1.68M tokens/s at 1K, 1.47M at 4K and 0.98M at 16K, so 6.5 minutes is about 500M tokens; this run, median "
        "tokens/s by sequence length: " + json.dumps(info.get("tokens_per_s_by_len", {})),
        f"* trained {info['steps']} steps, {info['tokens'] / 1e6:.1f}M tokens in {info['train_seconds']}s on {info['device']}; "
        f"whole command {info['gpu_minutes']} min; last logged loss {last.get('loss')} (answer tokens {last.get('answer_loss')}), "
        f"{last.get('tokens_per_s')} tokens/s",
        f"* corpus {info['chars_per_token']} chars/token; tasks used {info['tasks_used']}, dropped as too long {info['tasks_dropped_too_long']}",
        f"* resumed: {json.dumps(info['resumed'])}",
        "",
        "The learning-rate schedule and the curriculum follow elapsed time, so two runs with the same seed see the same",
        "data in the same order but may stop at a different step.",
        "",
    ]
    if ev:
        lines += ["## Accuracy (greedy, all answers present in order)", "", "| length | family | n | accuracy | answer recall |", "| --- | --- | --- | --- | --- |"]
        for L, fams in ev["lengths"].items():
            for f, s in fams.items():
                lines.append(f"| {L} | {f} | {s['n']} | {s['accuracy']} | {s['answer_recall']} |")
        lines.append("")
    with open(os.path.join(a.out, "RECIPE.md"), "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
