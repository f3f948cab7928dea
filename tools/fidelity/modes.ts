/**
 * The retrieval modes a fidelity run compares (the names of the one table, RETRIEVAL_NAMES, in
 * the report's order: the dense baseline first) and the configuration shared by all of them.
 */
import type { ModeName } from "../../services/common/retrieval.js";

export type { ModeName };
export const MODE_NAMES = ["dense", "oracle", "speculative", "freekv", "sink_window"] as const satisfies readonly ModeName[];

export interface RetrievalSettings {
  pageSize: number;
  sinkTokens: number;
  windowTokens: number;
  selectTokens: number;
  tau: number;
}

export const FIDELITY_DEFAULTS: RetrievalSettings = {
  pageSize: 32,
  sinkTokens: 128,
  windowTokens: 128,
  selectTokens: 1024,
  tau: 0.9,
};

export function parseModes(spec: string): ModeName[] {
  const modes = spec
    .split(",")
    .map((s) => s.trim())
    .filter((s) => s.length > 0);
  if (modes.length === 0) throw new RangeError("--modes is empty");
  for (const m of modes)
    if (!(MODE_NAMES as readonly string[]).includes(m)) throw new RangeError(`--modes: unknown mode '${m}' (known: ${MODE_NAMES.join(", ")})`);
  return [...new Set(modes)] as ModeName[];
}

export function validateSettings(s: RetrievalSettings): void {
  const int = (name: string, v: number, min: number) => {
    if (!Number.isInteger(v) || v < min) throw new RangeError(`--${name} must be an integer >= ${min} (got ${v})`);
  };
  int("page-size", s.pageSize, 1);
  int("sink", s.sinkTokens, 0);
  int("window", s.windowTokens, s.pageSize);
  int("select", s.selectTokens, s.pageSize);
  for (const [name, v] of [["sink", s.sinkTokens], ["window", s.windowTokens], ["select", s.selectTokens]] as const)
    if (v % s.pageSize !== 0) throw new RangeError(`--${name} (${v}) must be a multiple of --page-size (${s.pageSize})`);
  if (!Number.isFinite(s.tau)) throw new RangeError(`--tau must be a number (got ${s.tau})`);
}
