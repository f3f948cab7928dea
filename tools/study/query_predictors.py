#!/usr/bin/env python3
"""How well does a speculative query pick the pages the current query needs? Measured on the
trained model's own queries.

FreeKV selects step t's pages with step t-1's query and corrects a KV group when the two queries'
cosine is below tau. This runs the committed model (models/retrieval-8m) in float32 NumPy, an
implementation of the Llama forward written from the architecture alone (RMSNorm, RoPE, GQA,
SwiGLU, tied embeddings; no code shared with the service), greedy, on task prompts whose token ids
come from tools/study/encode-tasks.mjs. At every decode step and KV group it ranks the candidate
pages (the context minus the sink and window pages) by their exact softmax mass under several
predictors of the current query and compares each predictor's top-k pages with the current
query's own top-k (the oracle's):

  prev      q[t-1], FreeKV's speculative query
  extrap    2 q[t-1] - q[t-2], the previous query moved on by its last step
  mean2     (q[t-1] + q[t-2]) / 2
  prevsel   the previous step's oracle pages themselves (a selection reused, not re-ranked)

and reports per layer the top-k overlap with the oracle and the share of the current query's
candidate mass that the predictor's pages hold.

`--cache 1,2,4` also counts, per layer, the pages each step would recall over the link if a KV
group's device pool held C x k pages instead of k: the pool keeps the most recently selected
pages (each step's oracle pages are marked used and the least recently used beyond C x k leave),
and a page the current query selects that is not in the pool is a miss. C = 1 is the engine as it
is (the pool holds the last selection); the miss share is the recall volume relative to k pages a
step, whichever of the speculative or the corrected path brings the page. The generated tokens are written beside the
figures so they can be compared with the service's output on the same tasks (`--check EVAL_JSON`).

  node tools/study/encode-tasks.mjs --model models/retrieval-8m --tasks TASKS.jsonl --count 12 > ids.jsonl
  python3 tools/study/query_predictors.py --model models/retrieval-8m --ids ids.jsonl --out study.json \
      [--check eval.json] [--sink 512 --window 512 --select 1024 --page 32]

Needs only NumPy (about 10 s per 8K-token prompt on two cores).
"""
import argparse, json, lzma, math, os, struct, sys, time
import numpy as np


def load_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        raw = data[a:b]
        if meta["dtype"] == "BF16":
            u = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
            arr = u.view(np.float32)
        elif meta["dtype"] == "F32":
            arr = np.frombuffer(raw, dtype=np.float32)
        elif meta["dtype"] == "F16":
            arr = np.frombuffer(raw, dtype=np.float16).astype(np.float32)
        else:
            raise ValueError(f"{name}: dtype {meta['dtype']} not handled")
        out[name] = arr.reshape(meta["shape"]).copy()
    return out


class Llama:
    def __init__(self, folder):
        cfg = json.load(open(os.path.join(folder, "config.json")))
        self.cfg = cfg
        self.L = cfg["num_hidden_layers"]
        self.Hq = cfg["num_attention_heads"]
        self.Hkv = cfg["num_key_value_heads"]
        self.D = cfg.get("head_dim") or cfg["hidden_size"] // self.Hq
        self.eps = cfg["rms_norm_eps"]
        rp = cfg.get("rope_parameters") or {}
        theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
        if rp.get("rope_type", "default") != "default" or cfg.get("rope_scaling"):
            raise ValueError("only the default RoPE is implemented here")
        self.inv_freq = 1.0 / (theta ** (np.arange(0, self.D, 2, dtype=np.float64) / self.D))
        w = load_safetensors(os.path.join(folder, "model.safetensors"))
        self.w = w
        self.emb = w["model.embed_tokens.weight"]
        self.head = w.get("lm_head.weight", self.emb) if not cfg.get("tie_word_embeddings") else self.emb

    def rms(self, x, g):
        return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps)) * g

    def rope(self, x, pos):  # x [T, H, D], pos [T]
        f = np.outer(pos.astype(np.float64), self.inv_freq)
        cos = np.cos(np.concatenate([f, f], axis=-1)).astype(np.float32)[:, None, :]
        sin = np.sin(np.concatenate([f, f], axis=-1)).astype(np.float32)[:, None, :]
        h = self.D // 2
        rot = np.concatenate([-x[..., h:], x[..., :h]], axis=-1)
        return x * cos + rot * sin

    def forward(self, ids, cache, start):
        """ids [T] at positions start..start+T-1; cache: per layer (K [S, Hkv, D], V) grown in place.
        Returns the last position's logits and each layer's post-RoPE queries [T, Hq, D]."""
        T = len(ids)
        pos = np.arange(start, start + T)
        x = self.emb[np.asarray(ids)]
        qs = []
        g = self.Hq // self.Hkv
        for l in range(self.L):
            p = f"model.layers.{l}."
            h = self.rms(x, self.w[p + "input_layernorm.weight"])
            q = (h @ self.w[p + "self_attn.q_proj.weight"].T).reshape(T, self.Hq, self.D)
            k = (h @ self.w[p + "self_attn.k_proj.weight"].T).reshape(T, self.Hkv, self.D)
            v = (h @ self.w[p + "self_attn.v_proj.weight"].T).reshape(T, self.Hkv, self.D)
            q, k = self.rope(q, pos), self.rope(k, pos)
            K, V = cache[l]
            K = np.concatenate([K, k]) if K is not None else k
            V = np.concatenate([V, v]) if V is not None else v
            cache[l] = (K, V)
            qs.append(q)
            S = K.shape[0]
            out = np.empty((T, self.Hq, self.D), dtype=np.float32)
            scale = 1.0 / math.sqrt(self.D)
            for hq in range(self.Hq):
                kh, vh = K[:, hq // g, :], V[:, hq // g, :]
                for r0 in range(0, T, 2048):  # rows in blocks: a [2048, S] score matrix at a time
                    r1 = min(T, r0 + 2048)
                    s = (q[r0:r1, hq, :] @ kh.T) * scale
                    # causal: row i (position start+i) sees keys 0..start+i
                    lim = (start + np.arange(r0, r1))[:, None]
                    s = np.where(np.arange(S)[None, :] <= lim, s, -np.inf)
                    s -= s.max(axis=1, keepdims=True)
                    e = np.exp(s)
                    out[r0:r1, hq, :] = (e @ vh) / e.sum(axis=1, keepdims=True)
            x = x + out.reshape(T, -1) @ self.w[p + "self_attn.o_proj.weight"].T
            h = self.rms(x, self.w[p + "post_attention_layernorm.weight"])
            gate = h @ self.w[p + "mlp.gate_proj.weight"].T
            up = h @ self.w[p + "mlp.up_proj.weight"].T
            x = x + ((gate / (1.0 + np.exp(-gate))) * up) @ self.w[p + "mlp.down_proj.weight"].T
        x = self.rms(x[-1:], self.w["model.norm.weight"])
        return (x @ self.head.T)[0], qs


def page_mass(q_group, K, D, P, c0, c1):
    """Mean over the group's query heads of each candidate page's softmax mass (pages c0..c1-1 of P
    tokens); the softmax runs over the whole context, as attention does."""
    scale = 1.0 / math.sqrt(D)
    m = np.zeros(c1 - c0)
    for q in q_group:
        s = (K @ q) * scale
        s = np.exp(s - s.max())
        s /= s.sum()
        m += s[c0 * P:c1 * P].reshape(c1 - c0, P).sum(axis=1)
    return m / len(q_group)


def topk(v, k):
    k = min(k, len(v))
    return set(np.argpartition(-v, k - 1)[:k].tolist()) if k > 0 else set()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True, help="lines of {id, family, max_tokens, answer, ids}")
    ap.add_argument("--out", required=True)
    ap.add_argument("--check", help="a `freekv eval` JSON (or .json.xz): its dense texts beside ours")
    ap.add_argument("--sink", type=int, default=512)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--select", type=int, default=1024)
    ap.add_argument("--page", type=int, default=32)
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--cache", default="", help="pool sizes in multiples of k (e.g. 1,1.5,2,4): misses per step")
    a = ap.parse_args()
    caches = [float(c) for c in a.cache.split(",") if c]
    m = Llama(a.model)
    eos = m.cfg.get("eos_token_id")
    P, k = a.page, a.select // a.page
    SP, WP = a.sink // P, a.window // P
    preds = ["prev", "extrap", "mean2", "prevsel"]
    g = m.Hq // m.Hkv
    # per layer and predictor: sums of overlap and mass share, and the count of (step, group) samples
    acc = {l: {p: [0.0, 0.0, 0] for p in preds} for l in range(m.L)}
    cos_acc = {l: [0.0, 0] for l in range(m.L)}
    # per layer and pool size: summed misses / k, and the (step, group) samples counted
    miss_acc = {l: {c: [0.0, 0] for c in caches} for l in range(m.L)}
    tasks = [json.loads(x) for x in open(a.ids) if x.strip()]
    if a.count:
        tasks = tasks[:a.count]
    gens = []
    t0 = time.time()
    for ti, t in enumerate(tasks):
        cache = [(None, None) for _ in range(m.L)]
        ids = t["ids"]
        logits, _ = m.forward(ids, cache, 0)
        out, qhist = [], []  # qhist: per step, per layer, the [Hq, D] query
        prev_sel = [[None] * m.Hkv for _ in range(m.L)]
        # per layer, group and pool size: page -> the step it was last selected at
        pools = [[{c: {} for c in caches} for _ in range(m.Hkv)] for _ in range(m.L)]
        pos = len(ids)
        for step in range(t["max_tokens"]):
            tok = int(np.argmax(logits))
            out.append(tok)
            if tok == eos:
                break
            logits, qs = m.forward([tok], cache, pos)
            pos += 1
            qhist.append([q[0] for q in qs])
            ctx = pos  # tokens in the cache, the new one included
            pages = ctx // P
            c0, c1 = SP, max(SP, min(pages, (ctx - a.window) // P))
            for l in range(m.L):
                K = cache[l][0]
                qt = qhist[-1][l]
                for h in range(m.Hkv):
                    grp = slice(h * g, (h + 1) * g)
                    if c1 - c0 <= k:
                        continue  # every candidate page fits the budget: nothing to select
                    Kh = K[:, h, :]
                    cur = page_mass(qt[grp], Kh, m.D, P, c0, c1)
                    oracle = topk(cur, k)
                    total = cur.sum()
                    cands = {}
                    if len(qhist) >= 2:
                        qp = qhist[-2][l][grp]
                        cands["prev"] = qp
                        if len(qhist) >= 3:
                            qpp = qhist[-3][l][grp]
                            cands["extrap"] = 2 * qp - qpp
                            cands["mean2"] = (qp + qpp) / 2
                        for hh in range(g):
                            a_, b_ = qt[grp][hh], qp[hh]
                            cos_acc[l][0] += float(a_ @ b_ / (np.linalg.norm(a_) * np.linalg.norm(b_) + 1e-30))
                            cos_acc[l][1] += 1
                    for name, qv in cands.items():
                        sel = topk(page_mass(qv, Kh, m.D, P, c0, c1), k)
                        r = acc[l][name]
                        r[0] += len(sel & oracle) / k
                        r[1] += sum(cur[i] for i in sel) / total
                        r[2] += 1
                    ps = prev_sel[l][h]
                    if ps is not None and "extrap" in cands:  # same samples as extrap and mean2
                        sel = {i for i in ps if i < c1 - c0}
                        r = acc[l]["prevsel"]
                        r[0] += len(sel & oracle) / k
                        r[1] += sum(cur[i] for i in sel) / total
                        r[2] += 1
                    prev_sel[l][h] = oracle
                    for c in caches:
                        pool = pools[l][h][c]
                        if pool:  # the first selection fills an empty pool: not a step's recall
                            r = miss_acc[l][c]
                            r[0] += sum(1 for i in oracle if i not in pool) / k
                            r[1] += 1
                        for i in oracle:
                            pool[i] = step
                        cap = max(k, int(c * k))
                        if len(pool) > cap:
                            for i in sorted(pool, key=pool.get)[:len(pool) - cap]:
                                del pool[i]
        gens.append({"id": t["id"], "family": t["family"], "ids": out})
        print(f"[study] {ti + 1}/{len(tasks)} {t['id']}: {len(ids)} prompt tokens, {len(out)} generated, "
              f"{time.time() - t0:.0f} s", file=sys.stderr)
    res = {"model": a.model, "budget": {"sink": a.sink, "window": a.window, "select": a.select, "page": a.page},
           "tasks": len(tasks), "layers": {}, "generated": gens}
    for l in range(m.L):
        res["layers"][l] = {"adjacent_cosine": cos_acc[l][0] / max(1, cos_acc[l][1]),
                            **{p: {"topk_overlap": v[0] / v[2] if v[2] else None,
                                   "mass_share": v[1] / v[2] if v[2] else None, "samples": v[2]}
                               for p, v in acc[l].items()}}
        if caches:
            res["layers"][l]["pool_miss_share"] = {str(c): (v[0] / v[1] if v[1] else None) for c, v in miss_acc[l].items()}
    if a.check:
        op = lzma.open if a.check.endswith(".xz") else open
        ev = json.load(op(a.check, "rt"))
        dense = {r["id"]: r["text"] for r in ev["results"] if r["mode"] == "dense"}
        res["check"] = {"file": a.check, "dense_texts": {g_["id"]: dense.get(g_["id"]) for g_ in gens}}
    json.dump(res, open(a.out, "w"), indent=1)
    print(f"{'layer':>5} {'cos':>6} " + " ".join(f"{p + ' ovl':>12} {p + ' mass':>12}" for p in preds))
    for l in range(m.L):
        r = res["layers"][l]
        cells = []
        for p in preds:
            o, s = r[p]["topk_overlap"], r[p]["mass_share"]
            cells.append(f"{(o if o is not None else float('nan')):12.3f} {(s if s is not None else float('nan')):12.3f}")
        print(f"{l:>5} {r['adjacent_cosine']:6.3f} " + " ".join(cells))
    if caches:
        print("pages recalled a step per group, share of k, by pool size (x k):")
        print(f"{'layer':>5} " + " ".join(f"{c:>8g}" for c in caches))
        for l in range(m.L):
            v = res["layers"][l]["pool_miss_share"]
            print(f"{l:>5} " + " ".join(f"{(v[str(c)] if v[str(c)] is not None else float('nan')):8.3f}" for c in caches))


if __name__ == "__main__":
    main()
