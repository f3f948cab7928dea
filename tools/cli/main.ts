#!/usr/bin/env node
/**
 * The `freekv` command line.
 *
 *   freekv fidelity --trace FILE [...]     replay a trace through the engine, per retrieval mode
 *   freekv trace synth --out FILE [...]    write a synthetic fidelity trace
 *   freekv logits --model DIR --tokens ..  last-position logits of the model runner
 *   freekv generate --model DIR ...        generate with the model runner
 *   freekv eval --tasks FILE [...]         task accuracy through Generate, per retrieval mode
 */
const commands: Record<string, () => Promise<{ run(argv: string[]): Promise<number> }>> = {
  fidelity: () => import("./fidelity.js"),
  trace: () => import("./trace.js"),
  logits: () => import("./logits.js"),
  generate: () => import("./generate.js"),
  eval: () => import("./eval.js"),
};

async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  if (!cmd || cmd === "--help" || cmd === "-h" || !(cmd in commands)) {
    process.stderr.write(
      "usage: freekv <command> [options]\n\ncommands:\n" +
        "  fidelity --trace FILE.safetensors [--modes dense,oracle,speculative,freekv,sink_window] [--json]\n" +
        "  trace synth --out FILE.safetensors [options]\n" +
        "  logits --model DIR --tokens 1,2,3 [--json]\n" +
        "  generate --model DIR (--tokens 1,2,3 | --prompt TEXT) --max-tokens N [--greedy] [--json]\n" +
        "  eval --tasks FILE.jsonl [--model DIR] [--modes ...] [--budget S+K+W] [--target HOST:PORT] [--json OUT] [--svg OUT]\n\n" +
        "Each command takes --help.\n",
    );
    return cmd && !(cmd in commands) && cmd !== "--help" && cmd !== "-h" ? 2 : 0;
  }
  const mod = await commands[cmd]();
  return mod.run(rest);
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err: unknown) => {
    process.stderr.write(`freekv: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exit(1);
  },
);
