#!/usr/bin/env python3
"""Where a decode step's time goes, read off an Nsight Systems trace of a runner process.

Usage: nsys-step.py TRACE.sqlite [--json OUT.json]
  (the SQLite export of a report: `nsys export --type sqlite -o TRACE.sqlite REPORT.nsys-rep`)

The trace holds every kernel, copy and memset with its stream and its start and end on the
device. This reads the decode steps of the GPU model runner out of it and prints, per run of
consecutive decode steps (one runner mode at one point: the runner prefills between them), the
median per step of:
  * the main stream's span, its busy time per kind of work and its idle time;
  * per layer, the engine's part on the critical path: from the end of the layer's RoPE
    (BiasRopeSplitKernel, the last model kernel before the engine's) to the start of its decode
    attention, the main stream's busy time per kind in it and its idle time (a wait for an event
    of the side stream, or for the host's launches);
  * the side stream's busy time per kind (the speculative selection and recall);
  * the link: how long the main stream's recall gathers ran while a side-stream gather ran too
    (the two share the PCIe link), and how long the main stream sat idle while a side-stream
    gather ran.
A decode step is the main stream's work from one EmbedKernel to the next; it is a decode step when
it holds decode attention (DecodeAttentionWarpKernel), else a prompt's chunk. The main stream is the
one that runs the decode attention. Kernels launched inside a CUDA graph carry the stream the graph
was launched on.

Only the Python standard library is used (the GPU machine's python3 runs it as is).
"""
import json
import sqlite3
import statistics
import sys

KINDS = [
    ("attention", ("DecodeAttention", "DecodeCombine")),
    ("gather", ("RecallGather",)),
    ("selection", ("Selection", "ChunkMax", "ChunkSum", "ChunkTopK", "HierSeed", "HierPrune")),
    ("residency", ("Residency",)),  # the batched decode's recall runs inside ResidencyKernel
    ("correction", ("Correction",)),
    ("table", ("AttendTable",)),
    ("engine_small", ("CopyBatch", "Append", "PageSummary", "GroupBounds", "OffloadHnd", "ScatterRows", "Scatter")),
    ("model_small", ("RmsNorm", "BiasRopeSplit", "SwiGlu", "ToBf16", "Embed", "ArgmaxRows", "QueriesToBf16")),
    ("gemm", ("nvjet", "gemm", "Gemm", "GEMM", "cutlass", "splitK", "splitk", "reduce", "Reduce")),
]


def kind_of(name):
    for kind, keys in KINDS:
        if any(k in name for k in keys):
            return kind
    return "other"


def union(intervals):
    """Sorted disjoint union of (start, end) intervals."""
    out = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1][1] = e
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def length(u):
    return sum(e - s for s, e in u)


def intersect(a, b):
    """Intersection of two sorted disjoint unions."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if s < e:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def clip(u, lo, hi):
    return [(max(s, lo), min(e, hi)) for s, e in u if e > lo and s < hi]


def load(path):
    db = sqlite3.connect(path)
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "CUPTI_ACTIVITY_KIND_KERNEL" not in tables:
        raise SystemExit(f"{path}: no CUPTI_ACTIVITY_KIND_KERNEL table (was the report taken with -t cuda?)")
    cols = {r[1] for r in db.execute("PRAGMA table_info(CUPTI_ACTIVITY_KIND_KERNEL)")}
    name_col = "shortName" if "shortName" in cols else "demangledName"
    ops = []  # (start, end, stream, kind, name)
    for s, e, st, name in db.execute(
        f"SELECT k.start, k.end, k.streamId, s.value FROM CUPTI_ACTIVITY_KIND_KERNEL k "
        f"JOIN StringIds s ON s.id = k.{name_col}"
    ):
        ops.append((s, e, st, kind_of(name), name))
    for table, kind in (("CUPTI_ACTIVITY_KIND_MEMCPY", "copy"), ("CUPTI_ACTIVITY_KIND_MEMSET", "memset")):
        if table in tables:
            for s, e, st in db.execute(f"SELECT start, end, streamId FROM {table}"):
                ops.append((s, e, st, kind, kind))
    ops.sort()
    return ops


def analyse(ops):
    att_streams = {}
    for o in ops:
        if o[4].startswith("DecodeAttention"):
            att_streams[o[2]] = att_streams.get(o[2], 0) + 1
    if not att_streams:
        return {"runs": [], "note": "no decode attention in the trace"}
    main = max(att_streams, key=att_streams.get)
    main_ops = [o for o in ops if o[2] == main]
    side_ops = [o for o in ops if o[2] != main]
    # Forwards: the main stream's ops from one EmbedKernel to the next.
    forwards, cur = [], None
    for o in main_ops:
        if o[4].startswith("Embed"):
            cur = []
            forwards.append(cur)
        if cur is not None:
            cur.append(o)
    bounds = [f[0][0] for f in forwards] + [float("inf")]
    steps, runs, run = [], [], None
    for fi, f in enumerate(forwards):
        if not any(o[4].startswith("DecodeAttention") for o in f):
            run = None  # a prompt's chunk ends a run of decode steps
            continue
        st = step_figures(f, [o for o in side_ops if bounds[fi] <= o[0] < bounds[fi + 1]])
        if run is None:
            run = []
            runs.append(run)
        run.append(st)
        steps.append(st)
    return {"main_stream": main, "runs": [summarise(r) for r in runs]}


def step_figures(f, side):
    start, end = f[0][0], max(o[1] for o in f)
    busy = union([(o[0], o[1]) for o in f])
    by_kind = {}
    for o in f:
        by_kind[o[3]] = by_kind.get(o[3], 0) + (o[1] - o[0])
    # Layers: the i-th RoPE of the step with the i-th decode attention after it.
    ropes = [o for o in f if o[4].startswith("BiasRopeSplit")]
    atts = [o for o in f if o[4].startswith("DecodeAttention")]
    layers = []
    ai = 0
    for r in ropes:
        while ai < len(atts) and atts[ai][0] < r[1]:
            ai += 1
        if ai >= len(atts):
            break
        lo, hi = r[1], atts[ai][0]
        seg = {"span": hi - lo}
        inside = [o for o in f if o[0] >= lo and o[1] <= hi]
        for o in inside:
            seg[o[3]] = seg.get(o[3], 0) + (o[1] - o[0])
        seg["idle"] = (hi - lo) - length(clip(busy, lo, hi))
        layers.append(seg)
        ai += 1
    side_busy = {}
    for o in side:
        side_busy[o[3]] = side_busy.get(o[3], 0) + (o[1] - o[0])
    main_gather = union([(o[0], o[1]) for o in f if o[3] == "gather"])
    side_gather = union([(o[0], o[1]) for o in side if o[3] == "gather"])
    idle = [(a[1], b[0]) for a, b in zip(busy, busy[1:]) if b[0] > a[1]]
    layer_sum = {}
    for seg in layers:
        for k, v in seg.items():
            layer_sum[k] = layer_sum.get(k, 0) + v
    return {
        "span": end - start,
        "busy": by_kind,
        "idle": (end - start) - length(busy),
        "layers": len(layers),
        "engine_path": layer_sum,  # summed over the step's layers
        "side": side_busy,
        "gather_main": length(main_gather),
        "gather_side": length(side_gather),
        "gather_both": length(intersect(main_gather, side_gather)),
        "idle_while_side_gathers": length(intersect(idle, side_gather)),
    }


def median_dict(ds):
    keys = sorted({k for d in ds for k in d})
    return {k: statistics.median([d.get(k, 0) for d in ds]) for k in keys}


def summarise(run):
    flat = ("span", "idle", "layers", "gather_main", "gather_side", "gather_both", "idle_while_side_gathers")
    out = {"steps": len(run)}
    for k in flat:
        out[k] = statistics.median([s[k] for s in run])
    for k in ("busy", "engine_path", "side"):
        out[k] = median_dict([s[k] for s in run])
    out["mode_hint"] = (
        "speculative recall (side-stream gathers)" if out["side"].get("gather", 0) > 0
        else "blocking recall only" if out["busy"].get("gather", 0) > 0
        else "no recall (dense or resident)"
    )
    return out


def us(ns):
    return f"{ns / 1e3:9.1f}"


def report(res):
    lines = [f"main stream {res.get('main_stream')}; per run of decode steps, medians per step, us"]
    for i, r in enumerate(res["runs"]):
        lines.append("")
        lines.append(f"run {i}: {r['steps']} steps, {r['layers']:.0f} layers, {r['mode_hint']}")
        lines.append(f"  main stream: span {us(r['span'])}  idle {us(r['idle'])}")
        lines.append("    busy " + "  ".join(f"{k} {v / 1e3:.1f}" for k, v in sorted(r["busy"].items(), key=lambda kv: -kv[1])))
        ep = dict(r["engine_path"])
        span = ep.pop("span", 0)
        lines.append(f"  engine path (RoPE end -> attention start, all layers): {us(span)}  ({span / max(r['layers'], 1) / 1e3:.1f} a layer)")
        lines.append("    " + "  ".join(f"{k} {v / 1e3:.1f}" for k, v in sorted(ep.items(), key=lambda kv: -kv[1])))
        if r["side"]:
            lines.append("  side streams busy " + "  ".join(f"{k} {v / 1e3:.1f}" for k, v in sorted(r["side"].items(), key=lambda kv: -kv[1])))
        lines.append(f"  link: main gathers {us(r['gather_main'])}, side gathers {us(r['gather_side'])}, both at once {us(r['gather_both'])}; "
                     f"main idle while a side gather runs {us(r['idle_while_side_gathers'])}")
    return "\n".join(lines)


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__)
        return 2
    out = None
    if "--json" in argv:
        out = argv[argv.index("--json") + 1]
    res = analyse(load(argv[1]))
    print(report(res))
    if out:
        with open(out, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
