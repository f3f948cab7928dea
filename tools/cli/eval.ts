/**
 * `freekv eval --tasks FILE [...]`: accuracy of long-context tasks through the real Generate path,
 * once per retrieval mode. Either starts the kvstore and compute services here (the model folder
 * on the given backend) or sends the requests to a compute service at --target. Prints accuracy
 * with 95% Wilson intervals per family x context length x mode and, per mode, the retrieval
 * counters the service returns; writes JSON and an SVG chart on request.
 *
 * Exit codes: 0 every request answered; 1 some request failed (its task is scored wrong and its
 * error is in the JSON) or anything else went wrong; 2 bad options or a malformed task file.
 */
import { resolve } from "node:path";
import { nativeSettings } from "../../services/common/config.js";
import { MODE_NAMES, RETRIEVAL_NAMES, type ModeName } from "../../services/common/retrieval.js";
import { ModelConfigError } from "../../services/compute/model/config.js";
import { builtinModelDir, readModelFolder } from "../../services/compute/model/loader.js";
import { toSvg, writeSvg } from "../eval/chart.js";
import { progress } from "../eval/progress.js";
import { readableRetrieval, toJson, toTable, writeJson } from "../eval/report.js";
import { runEval, type EvalSettings } from "../eval/run.js";
import { summarize } from "../eval/summary.js";
import { EvalTarget } from "../eval/target.js";
import { readTasks, TaskError } from "../eval/tasks.js";
import { intOption, numberOption, parseOptions, parseTokenList, UsageError } from "./args.js";

const USAGE = `usage: freekv eval --tasks FILE.jsonl [options]

  --model DIR          Hugging Face model folder: served in process, and its tokenizer encodes
                       the prompts (with --target, the folder the target serves)  [built-in model]
  --tasks FILE         JSONL tasks (id, family, seed, context_tokens, depth, prompt, answer, max_tokens)
  --modes LIST         comma-separated, of ${MODE_NAMES.join(",")}   [all]
  --budget S+K+W       sink + selected + window tokens, e.g. 512+1024+512  [the service's defaults]
  --page-size P        tokens per page                         [the service's default]
  --tau X              correction threshold                    [the service's default]
  --dense-layers 0,1   layers that always attend densely
  --backend B          cpu or cuda, for the services started here  [cpu]
  --threads N          compute threads of the services started here  [all cores]
  --target HOST:PORT   send the requests to this running compute service instead
  --limit N            the first N tasks of the file only
  --concurrency K      requests in flight (the service batches their decode steps)  [1]
  --json OUT.json      write the run (machine, commit, date, model, command, every generation)
  --svg OUT.svg        write a chart of accuracy against context length per mode
  --verbose            echo the services' logs
`;

export async function run(argv: string[]): Promise<number> {
  try {
    return await evaluate(argv);
  } catch (e) {
    if (e instanceof UsageError || e instanceof TaskError || e instanceof ModelConfigError) {
      process.stderr.write(`freekv eval: ${e.message}\n`);
      return 2;
    }
    throw e;
  }
}

export function parseModes(list: string): ModeName[] {
  const modes: ModeName[] = [];
  for (const raw of list.split(",").map((s) => s.trim()).filter((s) => s !== "")) {
    if (!(MODE_NAMES as string[]).includes(raw)) throw new UsageError(`--modes: unknown mode '${raw}' (known: ${MODE_NAMES.join(", ")})`);
    if (!modes.includes(raw as ModeName)) modes.push(raw as ModeName);
  }
  if (modes.length === 0) throw new UsageError("--modes must name at least one mode");
  return modes;
}

/** "512+1024+512" -> sink, select, window. */
export function parseBudget(s: string): { sinkTokens: number; selectTokens: number; windowTokens: number } {
  const m = /^\s*(\d+)\s*\+\s*(\d+)\s*\+\s*(\d+)\s*$/.exec(s);
  if (!m) throw new UsageError(`--budget must be SINK+SELECT+WINDOW tokens, e.g. 512+1024+512 (got '${s}')`);
  const [sinkTokens, selectTokens, windowTokens] = m.slice(1).map(Number);
  return { sinkTokens, selectTokens, windowTokens };
}

async function evaluate(argv: string[]): Promise<number> {
  const v = parseOptions(
    argv,
    {
      model: { type: "string" },
      tasks: { type: "string" },
      modes: { type: "string" },
      budget: { type: "string" },
      "page-size": { type: "string" },
      tau: { type: "string" },
      "dense-layers": { type: "string" },
      backend: { type: "string" },
      threads: { type: "string" },
      target: { type: "string" },
      limit: { type: "string" },
      concurrency: { type: "string" },
      json: { type: "string" },
      svg: { type: "string" },
      verbose: { type: "boolean" },
    },
    USAGE,
  );
  if (!v) return 0;
  if (typeof v.tasks !== "string" || v.tasks === "") throw new UsageError(`--tasks FILE is required\n${USAGE}`);
  const modes = parseModes(typeof v.modes === "string" ? v.modes : MODE_NAMES.join(","));
  const backend = String(v.backend ?? "cpu");
  if (backend !== "cpu" && backend !== "cuda") throw new UsageError(`--backend must be cpu or cuda (got '${backend}')`);
  const target = typeof v.target === "string" ? v.target : undefined;
  if (target !== undefined && !/^[^\s:]+:\d+$|^\[[0-9a-fA-F:]+\]:\d+$/.test(target)) throw new UsageError(`--target must be HOST:PORT (got '${target}')`);
  if (target !== undefined && (v.backend !== undefined || v.threads !== undefined)) throw new UsageError("--backend and --threads are for the services started here; the target has its own");
  const limit = intOption(v, "limit", 0);
  if (limit < 0) throw new UsageError(`--limit must be >= 0 (got ${limit})`);
  const concurrency = intOption(v, "concurrency", 1);
  if (concurrency < 1) throw new UsageError(`--concurrency must be >= 1 (got ${concurrency})`);
  const threads = v.threads === undefined ? undefined : intOption(v, "threads", 0);
  if (threads !== undefined && threads < 1) throw new UsageError(`--threads must be >= 1 (got ${threads})`);
  const settings: EvalSettings = {
    ...(typeof v.budget === "string" ? parseBudget(v.budget) : {}),
    ...(v["page-size"] !== undefined ? { pageSize: intOption(v, "page-size", 0) } : {}),
    ...(v.tau !== undefined ? { tau: numberOption(v, "tau", 0) } : {}),
    ...(typeof v["dense-layers"] === "string" ? { denseLayers: parseTokenListUsage(v["dense-layers"]) } : {}),
  };

  const modelDir = resolve(typeof v.model === "string" ? v.model : builtinModelDir());
  const folder = readModelFolder(modelDir);
  if (!folder.codec) throw new UsageError(`the model at ${modelDir} has no tokenizer.json: eval sends text tasks`);
  let tasks = readTasks(v.tasks);
  if (limit > 0) tasks = tasks.slice(0, limit);

  const startedAt = new Date();
  const t0 = performance.now();
  process.stderr.write(
    `freekv eval: ${tasks.length} tasks x ${modes.length} modes (${modes.join(", ")}), model ${modelDir}, ` +
      (target ? `target ${target}` : `services started here (${backend})`) +
      "\n",
  );
  const evalTarget = target ? EvalTarget.connect(target) : await EvalTarget.start({ modelDir, backend, threads, echo: !!v.verbose });
  let results;
  try {
    const bar = progress("freekv eval");
    bar.update(0, tasks.length * modes.length, 0);
    let correct = 0;
    results = await runEval({
      target: evalTarget,
      codec: folder.codec,
      tasks,
      modes,
      settings,
      concurrency,
      onResult: (r, done, total) => {
        if (r.correct) correct++;
        bar.update(done, total, correct);
      },
    });
    bar.done();
  } finally {
    await evalTarget.close();
  }
  const seconds = (performance.now() - t0) / 1000;
  const summary = summarize(results, modes);
  const session = evalTarget.lastSession;
  if (session?.geometry && session.geometry.layers !== folder.spec.native.layers)
    process.stderr.write(`freekv eval: warning: the target serves a ${session.geometry.layers}-layer model but ${modelDir} has ${folder.spec.native.layers}: the prompts were encoded with another model's tokenizer\n`);
  process.stdout.write(toTable(summary));
  const native = Object.entries(nativeSettings());
  if (native.length && !target) process.stdout.write(`\nengine settings of the services started here: ${native.map(([k, x]) => `${k}=${x}`).join(" ")}\n`);
  const errors = results.filter((r) => r.error !== undefined);
  for (const r of errors.slice(0, 5)) process.stderr.write(`freekv eval: ${r.id} (${r.mode}) failed: ${r.error}\n`);
  if (errors.length > 5) process.stderr.write(`freekv eval: ... ${errors.length - 5} more failed requests (see --json)\n`);
  if (typeof v.json === "string") {
    writeJson(
      v.json,
      toJson(
        {
          command: ["freekv", "eval", ...argv],
          tasksFile: resolve(v.tasks),
          model: { dir: modelDir, architecture: folder.spec.architectureName, geometry: session?.geometry },
          target: target ?? "in process",
          backend: session?.backend ?? (target ? "unknown" : backend),
          settings: {
            // As given on the command line (absent = the service's default), then as each mode's session has it.
            requested: { page_size: settings.pageSize, sink_tokens: settings.sinkTokens, select_tokens: settings.selectTokens, window_tokens: settings.windowTokens, tau: settings.tau, dense_layers: settings.denseLayers },
            resolved: Object.fromEntries(modes.map((m) => [m, readableRetrieval(evalTarget.sessionsByMode.get(RETRIEVAL_NAMES.mode[m])?.retrieval)])),
          },
          concurrency,
          startedAt,
          seconds,
        },
        summary,
        results,
      ),
    );
    process.stderr.write(`freekv eval: wrote ${v.json}\n`);
  }
  if (typeof v.svg === "string") {
    writeSvg(v.svg, toSvg(summary));
    process.stderr.write(`freekv eval: wrote ${v.svg}\n`);
  }
  return errors.length > 0 ? 1 : 0;
}

function parseTokenListUsage(s: string): number[] {
  try {
    return parseTokenList(s, "--dense-layers");
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
}
