/**
 * In-process generation for the command line and tests: a model folder, an Engine of this
 * process (CPU backend) and one session over segments of an in-process kvstore (model/localHost.ts).
 */
import { loadAddon, type Engine, type EngineStats, type Retrieval } from "../../../native/binding.js";
import { MODE_NAMES, RETRIEVAL_NAMES, retrievalDefaults, validateRetrieval, type ModeName } from "../../common/retrieval.js";
import { loadModel, type LoadedModel } from "../model/loader.js";
import { createLocalSession, modelGeometry, type LocalSession } from "../model/localHost.js";
import { generate, isProgress, type GenerateChunkOut, type GenerateFinalOut, type GenerateParams } from "./generation.js";
import { ModelScheduler } from "./scheduler.js";

export interface RetrievalOptions {
  mode?: string;
  pageSize?: number;
  sink?: number;
  window?: number;
  select?: number;
  tau?: number;
  denseLayers?: number[];
}

/** The command-line option of each retrieval field. */
const OPTION: Record<string, string> = { pageSize: "page-size", sinkTokens: "sink", windowTokens: "window", selectTokens: "select", tau: "tau", denseLayers: "dense-layers" };

/** The native defaults, overridden by the options; validated by the native validator, errors naming the option. */
export function localRetrieval(o: RetrievalOptions, layers = 1 << 20): Retrieval {
  const mode = RETRIEVAL_NAMES.mode[(o.mode ?? "freekv") as ModeName];
  if (mode === undefined) throw new Error(`--mode must be one of ${MODE_NAMES.join(", ")}, got ${o.mode}`);
  const d = retrievalDefaults();
  const r: Retrieval = {
    ...d,
    pageSize: o.pageSize ?? d.pageSize,
    sinkTokens: o.sink ?? d.sinkTokens,
    windowTokens: o.window ?? d.windowTokens,
    selectTokens: o.select ?? d.selectTokens,
    tau: o.tau ?? d.tau,
    mode,
    denseLayers: o.denseLayers ?? [],
  };
  for (const [field, v] of Object.entries({ pageSize: r.pageSize, sinkTokens: r.sinkTokens, windowTokens: r.windowTokens, selectTokens: r.selectTokens }))
    if (!Number.isInteger(v)) throw new Error(`--${OPTION[field]} must be an integer, got ${v}`);
  const e = validateRetrieval(r, layers);
  if (e) {
    const option = OPTION[e.field.replace(/\[.*$/, "")] ?? e.field;
    throw new Error(`--${option} ${e.message.replace("the page size", "--page-size")}`);
  }
  return r;
}

export class LocalRunner {
  readonly loaded: LoadedModel;
  readonly engine?: Engine;
  readonly scheduler: ModelScheduler;
  private local?: LocalSession;
  private nextDense = 1;

  constructor(dir: string, threads?: number, prefillChunkTokens?: number) {
    this.engine = new (loadAddon().Engine)({ backend: "cpu", threads });
    this.loaded = loadModel(dir, { engine: this.engine, threads });
    this.scheduler = new ModelScheduler(this.loaded.model, { prefillChunkTokens });
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
      if (!isProgress(r.value)) onChunk?.(r.value);
    }
  }

  async close(): Promise<void> {
    await this.local?.close();
    this.local = undefined;
  }
}
