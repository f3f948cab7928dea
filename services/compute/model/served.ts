/**
 * The model Generate serves, loaded when compute starts (weights mapped and converted off the
 * event loop), never by the first request:
 *
 * - loading: health is NOT_SERVING; Generate and model CreateSession get UNAVAILABLE (retry, or
 *   wait for SERVING; they do not wait for the load themselves);
 * - ready: served, with the ModelScheduler that orders its prefill chunks and decode steps;
 * - failed: health stays NOT_SERVING, the reason is logged at error level, and those calls get
 *   FAILED_PRECONDITION naming it (fix the folder and restart the process);
 * - none (FREEKV_MODEL=none): an attention-only server; health follows the kvstore alone.
 */
import { status } from "@grpc/grpc-js";
import type { Model } from "../../../native/binding.js";
import { DType, type ModelGeometry } from "../../../proto/gen/freekv/v1/common.js";
import { ServiceError, failedPrecondition } from "../../common/errors.js";
import type { Logger } from "../../common/log.js";
import type { ModelScheduler } from "../generate/scheduler.js";
import type { LoadedModel } from "./loader.js";

/** FREEKV_MODEL's value for serving no model. */
export const NO_MODEL = "none";

export interface Served {
  loaded: LoadedModel;
  scheduler: ModelScheduler;
  geometry: ModelGeometry;
}

type State = { state: "loading" } | { state: "ready"; served: Served } | { state: "failed"; reason: string } | { state: "none" };

export interface ServedModelOptions {
  log: Logger;
  /** The scheduler of a loaded model. */
  scheduler(model: Model): ModelScheduler;
  /** After a load: how long it took (seconds), or undefined when it failed. */
  onLoad?(seconds: number | undefined): void;
}

export class ServedModel {
  private current: State;
  private readonly listeners: Array<() => void> = [];

  constructor(
    private readonly opts: ServedModelOptions,
    serveNone = false,
  ) {
    this.current = serveNone ? { state: "none" } : { state: "loading" };
  }

  /** Why the load failed, when it did (the model will not serve until a restart). */
  get failure(): string | undefined {
    return this.current.state === "failed" ? this.current.reason : undefined;
  }

  get state(): State["state"] {
    return this.current.state;
  }

  /** Whether the server can serve what it is configured for: the model is ready, or none is served. */
  get servable(): boolean {
    return this.current.state === "ready" || this.current.state === "none";
  }

  onChange(fn: () => void): void {
    this.listeners.push(fn);
  }

  /** The served model, or the status a call that needs it gets now. */
  get(): Served {
    const c = this.current;
    switch (c.state) {
      case "ready":
        return c.served;
      case "loading":
        throw new ServiceError(status.UNAVAILABLE, "the model is still loading (health is NOT_SERVING until it is ready); retry later");
      case "failed":
        throw failedPrecondition(c.reason);
      case "none":
        throw failedPrecondition(`no model is served (FREEKV_MODEL=${NO_MODEL}); use kind SESSION_KIND_ATTENTION with a geometry for attention-only sessions`);
    }
  }

  /** Geometry of the served model (model sessions take it), or the status as get() gives it. */
  geometry(): ModelGeometry {
    return this.get().geometry;
  }

  /** Runs the load (once) and records its outcome. Resolves with whether the model is ready. */
  async load(dir: string, load: () => Promise<LoadedModel>): Promise<boolean> {
    if (this.current.state !== "loading") throw new Error(`the model cannot be loaded in state ${this.current.state}`);
    const { log } = this.opts;
    const t0 = performance.now();
    let loaded: LoadedModel;
    try {
      loaded = await load();
    } catch (e) {
      const reason = `cannot load the model at ${dir}: ${(e as Error).message} (set FREEKV_MODEL to a Hugging Face folder, or run \`npm run build\` to make models/builtin)`;
      log.error({ dir, err: (e as Error).message }, `${reason}; health stays NOT_SERVING`);
      this.current = { state: "failed", reason };
      this.opts.onLoad?.(undefined);
      this.notify();
      return false;
    }
    const seconds = (performance.now() - t0) / 1000;
    const c = loaded.spec.native;
    const geometry: ModelGeometry = { layers: c.layers, queryHeads: c.qHeads, kvHeads: c.kvHeads, headDim: c.headDim, kvDtype: DType.D_TYPE_FLOAT32 };
    this.current = { state: "ready", served: { loaded, scheduler: this.opts.scheduler(loaded.model), geometry } };
    log.info({ dir: loaded.dir, architecture: loaded.spec.architectureName, layers: c.layers, tokenizer: !!loaded.codec, device: loaded.model.device, loadMs: Math.round(seconds * 1000) }, "model loaded");
    for (const note of loaded.spec.notes) log.warn({ dir: loaded.dir }, note);
    this.opts.onLoad?.(seconds);
    this.notify();
    return true;
  }

  private notify(): void {
    for (const fn of this.listeners) fn();
  }
}
