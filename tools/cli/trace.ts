/**
 * `freekv trace synth --out FILE [...]`: writes a synthetic fidelity trace (DESIGN.md section 6)
 * and prints the facts that make it worth replaying: adjacent-query cosine, how much softmax mass
 * the exact top pages hold at ~8% of the context, and where the needles and topic jumps are.
 */
import { intOption, numberOption, parseOptions, UsageError } from "./args.js";
import { SYNTH_DEFAULTS, synthesizeTrace, type SynthOptions } from "../fidelity/synth.js";
import { groupAdjacentCosines, summarizeCosines, topPageMass, pageMasses } from "../fidelity/trace-stats.js";
import { exactProbabilities } from "../fidelity/attention.js";
import { writeTrace } from "../fidelity/trace.js";

const USAGE = `usage: freekv trace synth --out FILE.safetensors [options]

  --prompt-len N     tokens prefilled before decoding        [${SYNTH_DEFAULTS.promptLen}]
  --steps T          decode steps                            [${SYNTH_DEFAULTS.steps}]
  --q-heads H        query heads                             [${SYNTH_DEFAULTS.qHeads}]
  --kv-heads H       key/value heads                         [${SYNTH_DEFAULTS.kvHeads}]
  --head-dim D       channels per head (multiple of 8)       [${SYNTH_DEFAULTS.headDim}]
  --topics K         topics per KV head                      [${SYNTH_DEFAULTS.topics}]
  --jump-every J     mean steps between topic jumps (0: off) [${SYNTH_DEFAULTS.jumpEvery}]
  --needles M        needle pages (over all KV heads)        [${SYNTH_DEFAULTS.needles}]
  --drift X          per-step query drift                    [${SYNTH_DEFAULTS.drift}]
  --seed S           PRNG seed                               [${SYNTH_DEFAULTS.seed}]
  --dtype f32|bf16   storage type                            [f32]
  --page-size P      page size for needles and the figures   [${SYNTH_DEFAULTS.pageSize}]
  --rope-theta B     RoPE base                               [${SYNTH_DEFAULTS.ropeTheta}]
  --name NAME        metadata name                           [synthetic-<seed>]
  --budget F         page fraction for the peakedness figure [0.08]
  --json             print the facts as JSON
`;

export async function run(argv: string[]): Promise<number> {
  try {
    return await synth(argv);
  } catch (e) {
    if (e instanceof UsageError || e instanceof RangeError) {
      process.stderr.write(`freekv trace: ${e.message}\n`);
      return 2;
    }
    throw e;
  }
}

async function synth(argv: string[]): Promise<number> {
  const [sub, ...rest] = argv;
  if (sub === undefined) {
    process.stderr.write(USAGE);
    return 2;
  }
  if (sub === "--help" || sub === "-h") {
    process.stdout.write(USAGE);
    return 0;
  }
  if (sub !== "synth") throw new UsageError(`unknown subcommand '${sub}' (expected 'synth')\n${USAGE}`);
  const v = parseOptions(rest, {
    out: { type: "string" },
    "prompt-len": { type: "string" },
    steps: { type: "string" },
    "q-heads": { type: "string" },
    "kv-heads": { type: "string" },
    "head-dim": { type: "string" },
    topics: { type: "string" },
    "jump-every": { type: "string" },
    needles: { type: "string" },
    drift: { type: "string" },
    seed: { type: "string" },
    dtype: { type: "string" },
    "page-size": { type: "string" },
    "rope-theta": { type: "string" },
    name: { type: "string" },
    budget: { type: "string" },
    json: { type: "boolean" },
  }, USAGE);
  if (!v) return 0;
  if (typeof v.out !== "string" || v.out === "") throw new UsageError("--out FILE is required");
  const dtypeRaw = String(v.dtype ?? "f32").toLowerCase();
  if (dtypeRaw !== "f32" && dtypeRaw !== "bf16") throw new UsageError(`--dtype must be f32 or bf16 (got '${String(v.dtype)}')`);
  const seed = intOption(v, "seed", SYNTH_DEFAULTS.seed);
  const opts: SynthOptions = {
    promptLen: intOption(v, "prompt-len", SYNTH_DEFAULTS.promptLen),
    steps: intOption(v, "steps", SYNTH_DEFAULTS.steps),
    qHeads: intOption(v, "q-heads", SYNTH_DEFAULTS.qHeads),
    kvHeads: intOption(v, "kv-heads", SYNTH_DEFAULTS.kvHeads),
    headDim: intOption(v, "head-dim", SYNTH_DEFAULTS.headDim),
    topics: intOption(v, "topics", SYNTH_DEFAULTS.topics),
    jumpEvery: intOption(v, "jump-every", SYNTH_DEFAULTS.jumpEvery),
    needles: intOption(v, "needles", SYNTH_DEFAULTS.needles),
    drift: numberOption(v, "drift", SYNTH_DEFAULTS.drift),
    seed,
    pageSize: intOption(v, "page-size", SYNTH_DEFAULTS.pageSize),
    ropeTheta: numberOption(v, "rope-theta", SYNTH_DEFAULTS.ropeTheta),
    sinkTokens: SYNTH_DEFAULTS.sinkTokens,
    name: typeof v.name === "string" ? v.name : `synthetic-${seed}`,
  };
  const budget = numberOption(v, "budget", 0.08);
  if (!(budget > 0 && budget <= 1)) throw new UsageError(`--budget must be in (0, 1] (got ${budget})`);

  const tr = synthesizeTrace(opts);
  // Facts: cosine over all steps; peakedness and needle figures on a sample of steps (the exact
  // softmax over the whole context per step and head is the costly part).
  const cos = summarizeCosines(groupAdjacentCosines(tr), 0.9);
  const stride = Math.max(1, Math.floor(tr.steps / 16));
  const peak = topPageMass(tr, opts.pageSize, budget, stride);
  const group = tr.qHeads / tr.kvHeads;
  const needleFacts = tr.needles.map((nd) => {
    let mass = 0;
    for (let j = 0; j < group; j++) {
      const qh = nd.kvHead * group + j;
      const p = exactProbabilities(tr.q, (nd.step * tr.qHeads + qh) * tr.headDim, tr.k, tr, nd.kvHead, tr.promptLen + nd.step + 1);
      mass += pageMasses(p, opts.pageSize)[nd.page] / group;
    }
    return { ...nd, mass };
  });
  const facts = {
    file: v.out,
    name: opts.name,
    prompt_len: tr.promptLen,
    steps: tr.steps,
    shape: { q: [tr.steps, tr.qHeads, tr.headDim], k: [tr.promptLen + tr.steps, tr.kvHeads, tr.headDim] },
    dtype: dtypeRaw,
    adjacent_cosine: cos,
    peakedness: { budget_fraction: budget, top_page_mass: peak.meanMass, min_top_page_mass: peak.minMass },
    jumps: tr.jumps,
    needles: needleFacts,
  };
  writeTrace(v.out, tr, dtypeRaw === "f32" ? "F32" : "BF16", {
    generator: "freekv trace synth",
    synth_options: JSON.stringify(opts),
    top_page_mass: peak.meanMass.toFixed(4),
    jumps: JSON.stringify(tr.jumps),
    needles: JSON.stringify(tr.needles),
  });
  if (v.json) {
    process.stdout.write(JSON.stringify(facts) + "\n");
    return 0;
  }
  const f = (x: number) => x.toFixed(3);
  process.stdout.write(
    `wrote ${v.out}: ${opts.name}, prompt ${tr.promptLen} + ${tr.steps} steps, q [${facts.shape.q}], k/v [${facts.shape.k}], ${dtypeRaw}\n` +
      `adjacent query cosine (group mean): mean ${f(cos.mean)}, p10 ${f(cos.p10)}, p90 ${f(cos.p90)}, below 0.9: ${(100 * cos.belowTau).toFixed(1)}%\n` +
      `exact top ${(100 * budget).toFixed(0)}% pages hold ${(100 * peak.meanMass).toFixed(1)}% of the softmax mass (min ${(100 * peak.minMass).toFixed(1)}%)\n` +
      `topic jumps at steps: ${tr.jumps.map((j, h) => `kv${h} [${j.join(",")}]`).join(" ")}\n` +
      (needleFacts.length
        ? `needles: ${needleFacts.map((n) => `kv${n.kvHead} page ${n.page} @ step ${n.step} (${(100 * n.mass).toFixed(0)}% of mass)`).join("; ")}\n`
        : ""),
  );
  return 0;
}
