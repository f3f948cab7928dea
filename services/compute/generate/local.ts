/**
 * In-process generation for the command line and tests: a model folder, an Engine of this
 * process (CPU backend) and one session over segments made here (model/localHost.ts). When the
 * addon was built without the engine, the model's own dense attention is used and `attention`
 * says so.
 */
import { loadAddon, GroupCombine, Mode, RecallMode, SummaryKind, type Engine, type EngineStats, type Retrieval } from "../../../native/binding.js";
import { loadModel, type LoadedModel } from "../model/loader.js";
import { createLocalSession, modelGeometry, type LocalSession } from "../model/localHost.js";
import { generate, type GenerateChunkOut, type GenerateFinalOut, type GenerateParams } from "./generation.js";
import { DecodeScheduler } from "./scheduler.js";

export const MODES: Record<string, Mode> = {
  freekv: Mode.FreeKV,
  dense: Mode.Dense,
  oracle: Mode.Oracle,
  speculative: Mode.Speculative,
  sink_window: Mode.SinkWindow,
};

export interface RetrievalOptions {
  mode?: string;
  pageSize?: number;
  sink?: number;
  window?: number;
  select?: number;
  tau?: number;
  denseLayers?: number[];
}

/** DESIGN.md section 2 defaults, overridden by the options; validated with named errors. */
export function localRetrieval(o: RetrievalOptions): Retrieval {
  const pageSize = o.pageSize ?? 32;
  const mode = MODES[o.mode ?? "freekv"];
  if (mode === undefined) throw new Error(`--mode must be one of ${Object.keys(MODES).join(", ")}, got ${o.mode}`);
  const check = (name: string, v: number, min: number) => {
    if (!Number.isInteger(v) || v < min) throw new Error(`--${name} must be an integer >= ${min}, got ${v}`);
    if (name !== "page-size" && v % pageSize) throw new Error(`--${name} must be a multiple of --page-size (${pageSize}), got ${v}`);
    return v;
  };
  check("page-size", pageSize, 1);
  return {
    pageSize,
    sinkTokens: check("sink", o.sink ?? 512, 0),
    windowTokens: check("window", o.window ?? 512, pageSize),
    selectTokens: check("select", o.select ?? 1024, pageSize),
    tau: o.tau ?? 0.9,
    summary: SummaryKind.MaxMin,
    combine: GroupCombine.SoftmaxMean,
    mode,
    recall: RecallMode.Gather,
    denseLayers: o.denseLayers ?? [],
  };
}

export class LocalRunner {
  readonly loaded: LoadedModel;
  readonly engine?: Engine;
  readonly scheduler: DecodeScheduler;
  private local?: LocalSession;
  private nextDense = 1;

  constructor(dir: string, threads?: number) {
    const addon = loadAddon();
    this.engine = typeof (addon as { Engine?: unknown }).Engine === "function" ? new addon.Engine({ backend: "cpu", threads }) : undefined;
    this.loaded = loadModel(dir, { engine: this.engine, threads });
    this.scheduler = new DecodeScheduler(this.loaded.model);
  }

  get attention(): "engine" | "dense" {
    return this.loaded.model.attention;
  }

  /** Opens the session (engine session over local segments, or a dense session number). */
  open(retrieval: Retrieval, maxContextTokens: number): number {
    if (this.engine) {
      this.local = createLocalSession(this.engine, modelGeometry(this.loaded.spec.native), retrieval, maxContextTokens);
      return this.local.session;
    }
    return this.nextDense++;
  }

  stats(session: number): EngineStats | undefined {
    return this.engine ? this.engine.stats(session) : undefined;
  }

  async run(session: number, maxContextTokens: number, params: GenerateParams, onChunk?: (c: GenerateChunkOut) => void): Promise<GenerateFinalOut> {
    const it = generate(this.loaded.model, this.scheduler, this.loaded.codec, { session, contextTokens: 0, maxContextTokens }, params);
    for (;;) {
      const r = await it.next();
      if (r.done) return r.value;
      onChunk?.(r.value);
    }
  }

  async close(): Promise<void> {
    await this.local?.close();
    this.local = undefined;
  }
}
