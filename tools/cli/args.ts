/**
 * Option parsing shared by the CLI's commands: strict options with --help, numbers checked so that
 * a bad value names its option, token lists, and the model runner of `--model DIR --threads N`.
 * Usage errors are UsageError (exit code 2).
 */
import { parseArgs, type ParseArgsConfig } from "node:util";
import { LocalRunner } from "../../services/compute/generate/local.js";
import { builtinModelDir } from "../../services/compute/model/loader.js";

export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

export function intOption(values: Record<string, unknown>, name: string, fallback: number): number {
  const raw = values[name];
  if (raw === undefined) return fallback;
  const n = Number(raw);
  if (typeof raw !== "string" || !/^-?\d+$/.test(raw.trim()) || !Number.isSafeInteger(n)) throw new UsageError(`--${name} must be an integer (got '${String(raw)}')`);
  return n;
}

export function numberOption(values: Record<string, unknown>, name: string, fallback: number): number {
  const raw = values[name];
  if (raw === undefined) return fallback;
  const n = Number(raw);
  if (typeof raw !== "string" || raw.trim() === "" || !Number.isFinite(n)) throw new UsageError(`--${name} must be a number (got '${String(raw)}')`);
  return n;
}

/**
 * Parses `argv` strictly against `options` (plus -h/--help). A parse error is a UsageError;
 * with --help the usage is printed and the result is undefined.
 */
export function parseOptions(argv: string[], options: NonNullable<ParseArgsConfig["options"]>, usage: string): Record<string, unknown> | undefined {
  let parsed;
  try {
    parsed = parseArgs({ args: argv, options: { ...options, help: { type: "boolean", short: "h" } }, strict: true, allowPositionals: false });
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  const v = parsed.values as Record<string, unknown>;
  if (!v.help) return v;
  process.stdout.write(usage);
  return undefined;
}

export function parseTokenList(s: string, name = "--tokens"): number[] {
  const parts = s.split(",").map((x) => x.trim()).filter((x) => x.length > 0);
  if (parts.length === 0) throw new Error(`${name} must list at least one token id`);
  return parts.map((x) => {
    if (!/^\d+$/.test(x)) throw new Error(`${name}: '${x}' is not a token id`);
    return Number(x);
  });
}

/** The retrieval budget options (page size and token budgets, tau) of fidelity and generate. */
export const BUDGET_OPTIONS = {
  "page-size": { type: "string" },
  sink: { type: "string" },
  window: { type: "string" },
  select: { type: "string" },
  tau: { type: "string" },
} as const;

/** The options of the commands that run the model in this process. */
export const MODEL_OPTIONS = {
  model: { type: "string" },
  threads: { type: "string" },
  json: { type: "boolean", default: false },
  help: { type: "boolean", short: "h", default: false },
} as const;

export const MODEL_USAGE = "  --model DIR          Hugging Face model folder (default: the built-in model)\n  --threads N          engine worker threads\n";

/** The model runner of --model (default: the built-in model) and --threads. */
export function openRunner(values: { model?: string; threads?: string }): LocalRunner {
  return new LocalRunner(values.model ?? builtinModelDir(), values.threads ? Number(values.threads) : undefined);
}
