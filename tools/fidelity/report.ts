/** The fidelity result as a table (default) or as the documented JSON object. */
import type { ModeName } from "./modes.js";
import type { ModeMetrics } from "./replay.js";

export function toJson(modes: Partial<Record<ModeName, ModeMetrics>>): string {
  const out: Record<string, ModeMetrics> = {};
  for (const [m, r] of Object.entries(modes)) {
    out[m] = { mass_recall: r.mass_recall, rel_error: r.rel_error, correction_rate: r.correction_rate, recall_bytes_per_step: r.recall_bytes_per_step };
  }
  return JSON.stringify({ modes: out });
}

export function toTable(modes: Partial<Record<ModeName, ModeMetrics>>): string {
  const head = ["mode", "mass_recall", "rel_error", "correction_rate", "recall_bytes_per_step"];
  const rows = Object.entries(modes).map(([m, r]) => [
    m,
    r.mass_recall.toFixed(4),
    r.rel_error.toExponential(3),
    r.correction_rate.toFixed(3),
    `${Math.round(r.recall_bytes_per_step)} (${(r.recall_bytes_per_step / 1024).toFixed(1)} KiB)`,
  ]);
  const width = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(width[i]) : c.padStart(width[i]))).join("  ");
  return [line(head), line(width.map((w) => "-".repeat(w))), ...rows.map(line)].join("\n") + "\n";
}
