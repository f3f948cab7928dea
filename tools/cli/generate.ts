/**
 * `freekv generate --model DIR (--tokens 1,2,3 | --prompt TEXT) --max-tokens N [--greedy] [--json]`
 * generates in this process with the model runner and the FreeKV engine, with the retrieval
 * options of a session (--mode, --page-size, --sink, --window, --select, --tau, --dense-layers).
 * Prints the text (or the ids when the model has no tokenizer); with --json
 * {"tokens": [...], "text": ..., "finish_reason": ..., "usage": ..., "stats": ...}.
 */
import { parseArgs } from "node:util";
import { MODE_NAMES } from "../../services/common/retrieval.js";
import { localRetrieval } from "../../services/compute/generate/local.js";
import { BUDGET_OPTIONS, MODEL_OPTIONS, MODEL_USAGE, openRunner, parseTokenList } from "./args.js";

const USAGE =
  "usage: freekv generate [--model DIR] (--tokens 1,2,3 | --prompt TEXT | --chat TEXT) --max-tokens N [options]\n" +
  MODEL_USAGE +
  "  --greedy             temperature 0 (the default unless --temperature is given)\n" +
  "  --temperature T --top-p P --top-k K --seed S   sampling\n" +
  "  --stop-token ID      (repeatable) stop token ids; the model's EOS ids are added unless --ignore-eos\n" +
  "  --stop TEXT          (repeatable) stop strings\n" +
  `  --mode M             ${MODE_NAMES.join("|")} (default freekv)\n` +
  "  --page-size P --sink S --window W --select N --tau T --dense-layers 0,1   retrieval config\n" +
  "  --json               machine-readable output\n";

export async function run(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      ...MODEL_OPTIONS,
      tokens: { type: "string" },
      prompt: { type: "string" },
      chat: { type: "string" },
      "max-tokens": { type: "string" },
      greedy: { type: "boolean", default: false },
      temperature: { type: "string" },
      "top-p": { type: "string" },
      "top-k": { type: "string" },
      seed: { type: "string" },
      "stop-token": { type: "string", multiple: true },
      stop: { type: "string", multiple: true },
      "ignore-eos": { type: "boolean", default: false },
      mode: { type: "string" },
      ...BUDGET_OPTIONS,
      "dense-layers": { type: "string" },
    },
  });
  if (values.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  const num = (name: string, v: string | undefined): number | undefined => {
    if (v === undefined) return undefined;
    const n = Number(v);
    if (!Number.isFinite(n)) throw new Error(`--${name} must be a number, got '${v}'`);
    return n;
  };
  const sources = [values.tokens, values.prompt, values.chat].filter((x) => x !== undefined).length;
  if (sources !== 1) {
    process.stderr.write("freekv generate: give exactly one of --tokens, --prompt, --chat\n" + USAGE);
    return 2;
  }
  const maxTokens = num("max-tokens", values["max-tokens"]);
  if (maxTokens === undefined || !Number.isInteger(maxTokens) || maxTokens < 1) {
    process.stderr.write("freekv generate: --max-tokens N (N >= 1) is required\n" + USAGE);
    return 2;
  }
  const retrieval = localRetrieval({
    mode: values.mode,
    pageSize: num("page-size", values["page-size"]),
    sink: num("sink", values.sink),
    window: num("window", values.window),
    select: num("select", values.select),
    tau: num("tau", values.tau),
    denseLayers: values["dense-layers"] ? parseTokenList(values["dense-layers"], "--dense-layers") : undefined,
  });
  const runner = openRunner(values);
  const { codec, spec } = runner.loaded;
  for (const note of spec.notes) process.stderr.write(`freekv generate: note: ${note}\n`);
  let prompt: number[];
  if (values.tokens !== undefined) prompt = parseTokenList(values.tokens);
  else if (!codec) throw new Error(`the model at ${runner.loaded.dir} has no tokenizer.json: use --tokens`);
  else if (values.chat !== undefined) prompt = codec.encodeChat([{ role: "user", content: values.chat }]);
  else prompt = codec.encode(values.prompt!, true, { maxBytes: Infinity });
  const temperature = values.greedy ? 0 : (num("temperature", values.temperature) ?? 0);
  const stopTokenIds = (values["stop-token"] ?? []).map((s) => parseTokenList(s, "--stop-token")[0]);
  if (!values["ignore-eos"]) stopTokenIds.push(...spec.eosTokenIds.filter((t) => t < runner.loaded.model.vocabSize));
  const maxContext = prompt.length + maxTokens;
  const session = runner.open(retrieval, maxContext);
  try {
    const final = await runner.run(
      session,
      maxContext,
      {
        prompt,
        maxTokens,
        sampling: { temperature, topP: num("top-p", values["top-p"]) ?? 0, topK: num("top-k", values["top-k"]) ?? 0, seed: BigInt(values.seed ?? 0) },
        stopTokenIds,
        stopStrings: values.stop ?? [],
      },
      values.json || !codec ? undefined : (c) => process.stdout.write(c.text),
    );
    const stats = runner.stats(session);
    if (values.json) {
      process.stdout.write(
        JSON.stringify({
          tokens: final.tokens,
          text: codec ? codec.decode(final.tokens) : undefined,
          finish_reason: final.finishReason,
          usage: { prompt_tokens: final.promptTokens, completion_tokens: final.completionTokens, context_tokens: final.contextTokens, prefill_ms: final.prefillMs, decode_ms: final.decodeMs },
          attention: runner.attention,
          stats,
        }) + "\n",
      );
    } else {
      if (!codec) process.stdout.write(final.tokens.join(",") + "\n");
      else process.stdout.write("\n");
      process.stderr.write(
        `[${final.finishReason}] ${final.promptTokens} prompt + ${final.completionTokens} generated tokens; prefill ${final.prefillMs.toFixed(1)} ms, ` +
          `decode ${final.decodeMs.toFixed(1)} ms; attention: ${runner.attention}` +
          (stats ? `; recalled ${stats.pagesRecalled} pages (${stats.recallBytes} B), corrections ${stats.corrections}/${stats.selections}` : "") +
          "\n",
      );
    }
  } finally {
    await runner.close();
  }
  return 0;
}
