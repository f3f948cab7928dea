/**
 * Decode batching across streams. Decode requests for the same layer that arrive within a short
 * window (FREEKV_DECODE_BATCH_WINDOW_US, 200 us by default) run as one engine.decode call; more
 * collect while a call runs, so under load batches grow by themselves. A batch holds a session
 * at most once and only sessions of one shape (the engine's contract); the rest go into the
 * next batch, in arrival order. Engine calls run one at a time.
 */
import { status } from "@grpc/grpc-js";
import type { Engine } from "../../../native/binding.js";
import { ServiceError, notFound, resourceExhausted } from "../../common/errors.js";
import { acquireAll } from "../sessions/lock.js";
import type { ComputeSession } from "../sessions/session.js";
import type { DecodeItemOp } from "./validate.js";

interface Entry {
  layer: number;
  items: DecodeItemOp[];
  outputs: Array<Float32Array | undefined>;
  remaining: number;
  signal: AbortSignal;
  settled: boolean;
  resolve(out: Float32Array[]): void;
  reject(e: unknown): void;
}

interface Item {
  entry: Entry;
  index: number;
}

export interface BatchObserver {
  /** One engine.decode call: how many sessions it held and how long it took. */
  batch(layer: number, size: number, seconds: number): void;
  /** After a session's layer got one more token. */
  appended(session: ComputeSession, layer: number): void;
}

/** Sessions that may share one engine call: same shapes and KV storage type. */
const shapeKey = (s: ComputeSession) => `${s.geometry.queryHeads}/${s.geometry.kvHeads}/${s.geometry.headDim}/${s.geometry.kvDtype}`;

export class DecodeBatcher {
  private pending: Entry[] = [];
  private scheduled = false;
  private running = false;

  constructor(
    private readonly engine: () => Engine,
    private readonly windowUs: number,
    private readonly observer: BatchObserver,
  ) {}

  submit(layer: number, items: DecodeItemOp[], signal: AbortSignal): Promise<Float32Array[]> {
    return new Promise((resolve, reject) => {
      const entry: Entry = { layer, items, outputs: new Array(items.length), remaining: items.length, signal, settled: false, resolve, reject };
      this.pending.push(entry);
      this.schedule();
    });
  }

  private schedule(): void {
    if (this.scheduled || this.running) return;
    this.scheduled = true;
    const start = process.hrtime.bigint();
    const windowNs = BigInt(this.windowUs) * 1000n;
    // setTimeout cannot wait 200 us; yield to I/O with setImmediate until the window is over.
    const tick = () => {
      if (process.hrtime.bigint() - start >= windowNs) {
        this.scheduled = false;
        void this.flush();
      } else setImmediate(tick);
    };
    setImmediate(tick);
  }

  private settle(e: Entry, err?: unknown): void {
    if (e.settled) return;
    e.settled = true;
    if (err !== undefined) e.reject(err);
    else e.resolve(e.outputs as Float32Array[]);
  }

  private async flush(): Promise<void> {
    this.running = true;
    try {
      while (this.pending.length) {
        const entries = this.pending;
        this.pending = [];
        const byLayer = new Map<number, Item[]>();
        for (const e of entries) {
          if (e.signal.aborted) {
            this.settle(e, e.signal.reason ?? new ServiceError(status.CANCELLED, "call cancelled"));
            continue;
          }
          const list = byLayer.get(e.layer) ?? [];
          e.items.forEach((_, index) => list.push({ entry: e, index }));
          byLayer.set(e.layer, list);
        }
        for (const [layer, items] of byLayer) {
          let rest = items;
          while (rest.length) {
            const batch: Item[] = [];
            const next: Item[] = [];
            const seen = new Set<string>();
            const key = shapeKey(rest[0].entry.items[rest[0].index].session);
            for (const it of rest) {
              const s = it.entry.items[it.index].session;
              if (it.entry.settled) continue;
              if (seen.has(s.id) || shapeKey(s) !== key) next.push(it);
              else {
                seen.add(s.id);
                batch.push(it);
              }
            }
            if (batch.length) await this.run(layer, batch);
            rest = next;
          }
        }
      }
    } finally {
      this.running = false;
    }
  }

  private async run(layer: number, batch: Item[]): Promise<void> {
    const sessions = batch.map((it) => it.entry.items[it.index].session);
    const release = await acquireAll(sessions.map((s) => ({ key: s.id, lock: s.lock })));
    try {
      const live: Item[] = [];
      for (const it of batch) {
        const s = it.entry.items[it.index].session;
        if (it.entry.settled) continue;
        if (it.entry.signal.aborted) this.settle(it.entry, it.entry.signal.reason);
        else if (s.closed) this.settle(it.entry, notFound(`session ${JSON.stringify(s.id)} was closed`));
        else if (s.layerTokens[layer] + 1 > s.maxContextTokens) {
          this.settle(it.entry, resourceExhausted(`decode: layer ${layer} of session ${s.id} is full (max_context_tokens ${s.maxContextTokens})`));
        } else live.push(it);
      }
      if (!live.length) return;
      const t0 = process.hrtime.bigint();
      let outs: Float32Array[];
      try {
        outs = await this.engine().decode(
          layer,
          live.map((it) => {
            const op = it.entry.items[it.index];
            return { session: op.session.engineSession!, q: op.q, k: op.k, v: op.v };
          }),
        );
      } catch (e) {
        for (const it of live) this.settle(it.entry, e);
        return;
      }
      this.observer.batch(layer, live.length, Number(process.hrtime.bigint() - t0) / 1e9);
      live.forEach((it, i) => {
        const s = it.entry.items[it.index].session;
        s.layerTokens[layer]++;
        this.observer.appended(s, layer);
        it.entry.outputs[it.index] = outs[i];
        if (--it.entry.remaining === 0) this.settle(it.entry);
      });
    } finally {
      release();
    }
  }
}
