/**
 * What `freekv eval` prints and writes: the accuracy table (family x context length, one column
 * per mode), the per-mode retrieval table, and the JSON document (machine, commit, date, model,
 * command, settings, every cell and every task's generation).
 */
import { execFileSync } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import os from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import type { RetrievalConfig } from "../../proto/gen/freekv/v1/common.js";
import { nativeSettings } from "../../services/common/config.js";
import { RETRIEVAL_NAMES } from "../../services/common/retrieval.js";
import type { TaskResult } from "./run.js";
import type { Cell, Summary } from "./summary.js";

/**
 * What the service does not report, so the harness cannot either: the Generate final message
 * carries RetrievalStats per layer (RetrievalStats.layers), summed over KV heads and decode steps.
 */
export const NOT_EXPOSED = [
  "per-KV-head dynamics (adjacent-query cosine, corrections, top-k overlap): RetrievalStats.layers sums each layer's KV heads",
  "per-step series: RetrievalStats sums a generation's decode steps",
];

const pct = (x: number) => (100 * x).toFixed(1);

function cellText(c: Cell | undefined): string {
  if (!c) return "-";
  return `${pct(c.accuracy)} [${pct(c.wilson95[0])}, ${pct(c.wilson95[1])}] ${c.correct}/${c.n}`;
}

/** Columns before `left` are left-aligned (labels), the rest right-aligned (figures). */
function table(head: string[], rows: string[][], left: number): string {
  const w = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (r: string[]) => r.map((x, i) => (i < left ? x.padEnd(w[i]) : x.padStart(w[i]))).join("  ").trimEnd();
  return [line(head), w.map((n) => "-".repeat(n)).join("  "), ...rows.map(line)].join("\n") + "\n";
}

/** The two tables, as text. */
export function toTable(s: Summary): string {
  const modes = s.modes.map((m) => m.mode);
  const keys = [...new Map(s.cells.map((c) => [`${c.family}\u0000${c.context_tokens}`, c])).values()];
  const rows = keys.map((k) => [
    k.family,
    String(k.context_tokens),
    ...modes.map((m) => cellText(s.cells.find((c) => c.family === k.family && c.context_tokens === k.context_tokens && c.mode === m))),
  ]);
  let out = "accuracy % [95% Wilson interval] correct/n, per family and context length (target tokens)\n";
  out += table(["family", "context", ...modes], rows, 2);
  out += "\nper mode (retrieval counters summed over layers and KV heads, per decode step)\n";
  out += table(
    ["mode", "accuracy %", "95% interval", "answers found %", "errors", "correction rate", "recalled pages/step", "recalled KiB/step", "hit rate", "prefill ms", "decode ms/token"],
    s.modes.map((m) => [
      m.mode,
      pct(m.accuracy),
      `[${pct(m.wilson95[0])}, ${pct(m.wilson95[1])}]`,
      pct(m.answer_fraction),
      String(m.errors),
      m.retrieval.selections ? m.retrieval.correction_rate.toFixed(3) : "-",
      m.retrieval.decode_steps ? m.retrieval.pages_recalled_per_step.toFixed(1) : "-",
      m.retrieval.decode_steps ? (m.retrieval.recall_bytes_per_step / 1024).toFixed(1) : "-",
      m.retrieval.pages_selected ? m.retrieval.hit_rate.toFixed(3) : "-",
      m.prefill_ms_mean.toFixed(1),
      m.decode_ms_per_token.toFixed(2),
    ]),
    1,
  );
  if (s.families.length) {
    out += "\nper family and mode that selects pages (counters summed over the family's requests, per decode step)\n";
    out += table(
      ["family", "mode", "decode steps", "correction rate", "recalled pages/step", "recalled KiB/step", "hit rate"],
      s.families.map((f) => [
        f.family,
        f.mode,
        String(f.decode_steps),
        f.correction_rate.toFixed(3),
        f.pages_recalled_per_step.toFixed(1),
        (f.recall_bytes_per_step / 1024).toFixed(1),
        f.hit_rate.toFixed(3),
      ]),
      1,
    );
  }
  const layerRows = s.modes.flatMap((m) =>
    m.retrieval.layers.map((l) => [
      m.mode,
      String(l.layer),
      String(l.cosine_samples),
      l.cosine_samples ? l.cosine_mean.toFixed(3) : "-",
      l.cosine_samples ? l.cosine_std.toFixed(3) : "-",
      l.cosine_samples ? l.cosine_min.toFixed(3) : "-",
      l.cosine_samples ? pct(l.cosine_below_tau_fraction) : "-",
      l.selections ? l.correction_rate.toFixed(3) : "-",
      l.pages_selected ? l.hit_rate.toFixed(3) : "-",
      l.topk_overlap ? l.topk_overlap.toFixed(3) : "-",
    ]),
  );
  if (layerRows.length) {
    out += "\nper mode and layer (adjacent-query group cosine cos(q_t, q_t-1), sampled in every mode; below tau = freekv's correction test)\n";
    out += table(["mode", "layer", "cos samples", "cos mean", "cos std", "cos min", "below tau %", "correction rate", "hit rate", "top-k overlap"], layerRows, 1);
  }
  out += `not reported by the service: ${NOT_EXPOSED.map((x) => x.split(":")[0]).join("; ")}\n`;
  return out;
}

const nameOf = (table: Record<string, number>, v: number) => Object.entries(table).find(([, n]) => n === v)?.[0] ?? String(v);

/** A resolved RetrievalConfig with its enums by name and tau as the float32 it is, rounded. */
export function readableRetrieval(r: RetrievalConfig | undefined) {
  if (!r) return undefined;
  return {
    mode: nameOf(RETRIEVAL_NAMES.mode, r.mode),
    page_size: r.pageSize,
    sink_tokens: r.sinkTokens,
    select_tokens: r.selectTokens,
    window_tokens: r.windowTokens,
    tau: Number(r.tau.toPrecision(6)),
    summary: nameOf(RETRIEVAL_NAMES.summary, r.summary),
    combine: nameOf(RETRIEVAL_NAMES.combine, r.combine),
    recall: nameOf(RETRIEVAL_NAMES.recall, r.recall),
    dense_layers: r.denseLayers,
  };
}

export interface RunInfo {
  command: string[];
  tasksFile: string;
  model: { dir: string; architecture?: string; geometry?: unknown };
  target: string;
  backend: string;
  settings: unknown;
  concurrency: number;
  startedAt: Date;
  seconds: number;
}

/** HEAD of the repository this file is in, "+dirty" with uncommitted changes; undefined outside git. */
export function gitCommit(): string | undefined {
  const repo = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
  try {
    const head = execFileSync("git", ["rev-parse", "HEAD"], { cwd: repo, encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] }).trim();
    const dirty = execFileSync("git", ["status", "--porcelain", "--untracked-files=no"], { cwd: repo, encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] }).trim() !== "";
    return head + (dirty ? "+dirty" : "");
  } catch {
    return undefined;
  }
}

export function machine() {
  const cpus = os.cpus();
  return {
    hostname: os.hostname(),
    platform: `${os.platform()} ${os.release()}`,
    arch: os.arch(),
    cpus: cpus.length,
    cpu_model: cpus[0]?.model,
    memory_gb: Math.round(os.totalmem() / 2 ** 30),
    node: process.version,
  };
}

/** The JSON document of a run. */
export function toJson(info: RunInfo, s: Summary, results: readonly TaskResult[]) {
  return {
    tool: "freekv eval",
    date: info.startedAt.toISOString(),
    seconds: info.seconds,
    commit: gitCommit() ?? null,
    machine: machine(),
    command: info.command,
    model: info.model,
    target: info.target,
    backend: info.backend,
    tasks: { file: info.tasksFile, count: new Set(results.map((r) => r.id)).size },
    settings: info.settings,
    // The addon's settings in this process's environment: those of the services it started (with
    // --target, the remote service's own are not known here).
    native_settings: nativeSettings(),
    concurrency: info.concurrency,
    scoring:
      "correct = every expected answer is a substring of the generated text; for multi_query, ordered_retrieval and multi_value each after the previous one found; answer_fraction = found / expected",
    modes: s.modes,
    cells: s.cells,
    families: s.families,
    not_exposed: NOT_EXPOSED,
    results,
  };
}

export function writeJson(file: string, doc: unknown): void {
  mkdirSync(dirname(file), { recursive: true });
  writeFileSync(file, JSON.stringify(doc, null, 2) + "\n");
}
