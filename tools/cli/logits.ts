/**
 * `freekv logits --model DIR --tokens 1,2,3 [--json]`: the last-position logits of the model
 * runner for a token sequence, computed in this process (prefill attention is exact in every
 * retrieval mode). With --json: {"logits": [...]}; otherwise one line of numbers.
 */
import { parseArgs } from "node:util";
import { localRetrieval } from "../../services/compute/generate/local.js";
import { MODEL_OPTIONS, MODEL_USAGE, openRunner, parseTokenList } from "./args.js";

const USAGE = "usage: freekv logits [--model DIR] --tokens 1,2,3 [--json] [--threads N]\n" + MODEL_USAGE;

export async function run(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: { ...MODEL_OPTIONS, tokens: { type: "string" } },
  });
  if (values.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  if (!values.tokens) {
    process.stderr.write("freekv logits: --tokens is required\n" + USAGE);
    return 2;
  }
  const tokens = parseTokenList(values.tokens);
  const runner = openRunner(values);
  const vocab = runner.loaded.model.vocabSize;
  tokens.forEach((t, i) => {
    if (t >= vocab) throw new Error(`--tokens[${i}]: token id ${t} is out of range [0, ${vocab})`);
  });
  const session = runner.open(localRetrieval({ mode: "dense", pageSize: 32, sink: 32, window: 32, select: 32 }), tokens.length + 1);
  try {
    const logits = await runner.loaded.model.prefill(session, Int32Array.from(tokens), 0, false);
    const values = Array.from(logits);
    if (argv.includes("--json")) process.stdout.write(JSON.stringify({ logits: values }) + "\n");
    else process.stdout.write(values.map((x) => x.toPrecision(7)).join(" ") + "\n");
  } finally {
    await runner.close();
  }
  return 0;
}
