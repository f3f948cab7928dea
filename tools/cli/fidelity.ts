/**
 * `freekv fidelity --trace FILE [...]`: replays a trace through the engine once per retrieval
 * mode and reports, per mode, the exact softmax mass on the attended tokens, the output's
 * relative error against exact float64 attention, the correction rate and the recall traffic.
 *
 * Exit codes: 0 done; 2 bad options or a malformed trace (the message names the problem);
 * 1 anything else (e.g. the native engine is not built).
 */
import { writeFileSync } from "node:fs";
import { BUDGET_OPTIONS, intOption, numberOption, parseOptions, UsageError } from "./args.js";
import { FIDELITY_DEFAULTS, MODE_NAMES, parseModes, validateSettings, type ModeName, type RetrievalSettings } from "../fidelity/modes.js";
import { NativeTarget } from "../fidelity/native-target.js";
import { PolicyModel } from "../fidelity/policy-model.js";
import { progressBar } from "../fidelity/progress.js";
import { replay } from "../fidelity/replay.js";
import type { ReplayTarget } from "../fidelity/replay-target.js";
import { toJson, toTable } from "../fidelity/report.js";
import { loadTrace, TraceError } from "../fidelity/trace.js";
import { groupAdjacentCosines } from "../fidelity/trace-stats.js";

const USAGE = `usage: freekv fidelity --trace FILE.safetensors [options]

  --modes LIST       comma-separated, of ${MODE_NAMES.join(",")}   [all]
  --page-size P      tokens per page                             [${FIDELITY_DEFAULTS.pageSize}]
  --sink S           sink tokens                                 [${FIDELITY_DEFAULTS.sinkTokens}]
  --window W         window tokens                               [${FIDELITY_DEFAULTS.windowTokens}]
  --select K         selected tokens                             [${FIDELITY_DEFAULTS.selectTokens}]
  --tau X            correction threshold                        [${FIDELITY_DEFAULTS.tau}]
  --engine E         native (the CPU engine) or model (float64 policy model) [native]
  --threads N        engine worker threads                       [engine default]
  --kv-dtype T       engine KV storage, f32 or bf16 (native)     [f32]
  --recall R         gather or double_buffer (native)            [gather]
  --per-step FILE    also write per-step mass recall per mode as CSV
  --json             print {"modes": {"<mode>": {...}}} only
`;

export async function run(argv: string[]): Promise<number> {
  try {
    return await fidelity(argv);
  } catch (e) {
    if (e instanceof UsageError || e instanceof RangeError || e instanceof TraceError) {
      process.stderr.write(`freekv fidelity: ${e.message}\n`);
      return 2;
    }
    throw e;
  }
}

async function fidelity(argv: string[]): Promise<number> {
  const v = parseOptions(argv, {
    trace: { type: "string" },
    modes: { type: "string" },
    ...BUDGET_OPTIONS,
    engine: { type: "string" },
    threads: { type: "string" },
    "kv-dtype": { type: "string" },
    recall: { type: "string" },
    "per-step": { type: "string" },
    json: { type: "boolean" },
  }, USAGE);
  if (!v) return 0;
  if (typeof v.trace !== "string" || v.trace === "") throw new UsageError(`--trace FILE is required\n${USAGE}`);
  const modes = parseModes(typeof v.modes === "string" ? v.modes : MODE_NAMES.join(","));
  const settings: RetrievalSettings = {
    pageSize: intOption(v, "page-size", FIDELITY_DEFAULTS.pageSize),
    sinkTokens: intOption(v, "sink", FIDELITY_DEFAULTS.sinkTokens),
    windowTokens: intOption(v, "window", FIDELITY_DEFAULTS.windowTokens),
    selectTokens: intOption(v, "select", FIDELITY_DEFAULTS.selectTokens),
    tau: numberOption(v, "tau", FIDELITY_DEFAULTS.tau),
  };
  validateSettings(settings);
  const engineKind = String(v.engine ?? "native");
  if (engineKind !== "native" && engineKind !== "model") throw new UsageError(`--engine must be native or model (got '${engineKind}')`);
  const threads = v.threads === undefined ? undefined : intOption(v, "threads", 0);
  if (threads !== undefined && threads < 1) throw new UsageError(`--threads must be >= 1 (got ${threads})`);

  const kvDtype = String(v["kv-dtype"] ?? "f32");
  if (kvDtype !== "f32" && kvDtype !== "bf16") throw new UsageError(`--kv-dtype must be f32 or bf16 (got '${kvDtype}')`);
  const recall = String(v.recall ?? "gather");
  if (recall !== "gather" && recall !== "double_buffer") throw new UsageError(`--recall must be gather or double_buffer (got '${recall}')`);

  const trace = loadTrace(v.trace);
  const geo = { qHeads: trace.qHeads, kvHeads: trace.kvHeads, headDim: trace.headDim, capacityTokens: trace.promptLen + trace.steps };
  let makeTarget: (m: ModeName) => ReplayTarget;
  if (engineKind === "model") {
    makeTarget = (m) => new PolicyModel(geo, settings, m, kvDtype);
  } else {
    const { loadAddon } = await import("../../native/binding.js");
    const addon = loadAddon();
    const engine = new addon.Engine({ backend: "cpu", threads });
    makeTarget = (m) => NativeTarget.create(addon, engine, m, { ...geo, settings, kvDtype, recall });
  }
  const bar = progressBar(`replaying ${trace.name}`);
  const result = await replay(trace, modes, makeTarget, { onStep: (d, t) => bar.update(d, t), budget: settings });
  bar.done();
  if (typeof v["per-step"] === "string") {
    // step, then per KV head the group's cos(q_t, q_{t-1}) (what correction compares with tau),
    // then each mode's mass recall at that step (mean over query heads).
    const cos = groupAdjacentCosines(trace);
    const head = ["step", ...cos.map((_, h) => `cos_kv${h}`), ...modes.map((m) => `mass_${m}`)];
    const lines = [head.join(",")];
    for (let t = 0; t < trace.steps; t++)
      lines.push([t, ...cos.map((c) => (t === 0 ? "" : c[t].toFixed(5))), ...modes.map((m) => result.perStep[m]![t].toFixed(6))].join(","));
    writeFileSync(v["per-step"], lines.join("\n") + "\n");
  }
  if (v.json) {
    process.stdout.write(toJson(result.modes) + "\n");
  } else {
    process.stdout.write(
      `trace ${trace.name}: prompt ${trace.promptLen} + ${trace.steps} steps, Hq ${trace.qHeads}, Hkv ${trace.kvHeads}, D ${trace.headDim} (${trace.dtype}); ` +
        `page ${settings.pageSize}, sink ${settings.sinkTokens}, window ${settings.windowTokens}, select ${settings.selectTokens}, tau ${settings.tau}; engine ${engineKind}` +
        (engineKind === "native" ? ` (${kvDtype} KV, ${recall} recall)` : "") +
        "\n",
    );
    process.stdout.write(toTable(result.modes));
    process.stdout.write(
      `ideal at this budget (sink + window + each head's exact top ${settings.selectTokens / settings.pageSize} pages): mass ${result.idealMass!.toFixed(4)}\n`,
    );
  }
  return 0;
}
