/**
 * The Attention stream's AttentionBatcher with the engine on the CPU backend, in process, so a
 * test can hold a session's lock as a prefill on another stream, a move or a CloseSession would:
 * - a session whose lock is held delays only its own items: the other sessions' decodes (also
 *   those of the same request) run while it is held; its item runs once the lock is released;
 * - a cancelled call or an expired deadline ends the wait for the lock at once, with the signal's
 *   reason, and appends nothing;
 * - two requests over the same sessions in opposite orders both complete, each session's items in
 *   the order they were submitted;
 * - a failed engine call: one that failed before appending anything (a session the binding
 *   refuses, a reservation the engine refuses) runs the other items again, each alone; one that
 *   may have appended marks its sessions so that their later calls fail with DATA_LOSS.
 * Every output is compared with exact float64 attention over the session's history (the budget
 * covers every context here), as in the Attention stream's integration tests.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { status } from "@grpc/grpc-js";
import { loadAddon, type Engine } from "../../native/binding.js";
import { DType, type ModelGeometry, type RetrievalConfig } from "../../proto/gen/freekv/v1/common.js";
import { SessionKind } from "../../proto/gen/freekv/v1/compute.js";
import type { AttachSessionResponse } from "../../proto/gen/freekv/v1/kvstore.js";
import { ServiceError } from "../../services/common/errors.js";
import { AttentionBatcher } from "../../services/compute/attention/batcher.js";
import type { DecodeItemOp } from "../../services/compute/attention/validate.js";
import { checkDiverged, divergedError } from "../../services/compute/sessions/diverged.js";
import { ComputeSession } from "../../services/compute/sessions/session.js";
import { exactAttention, relError } from "../../tools/reference/attention.js";
import { prng, randomF32 } from "../helpers/prng.js";
import { createHost, geometryOf, retrievalOf, type Host } from "./reference/harness.js";

const seed = (Date.now() ^ (process.pid << 6)) >>> 0;
const rand = prng(seed);

const LAYERS = 2;
const P = 16;
// Budget = sink 32 + select 512 + window 32 = 576 tokens >= every context below: exact output.
const CONFIG = { qHeads: 4, kvHeads: 2, headDim: 32, pageSize: P, sinkTokens: 32, windowTokens: 32, selectTokens: 512, tau: 0.9, summary: "maxmin", combine: "softmax_mean", mode: "freekv", dtype: "f32" } as const;
const QD = CONFIG.qHeads * CONFIG.headDim;
const KV = CONFIG.kvHeads * CONFIG.headDim;
const MAX_CONTEXT = 512;
/** How long a wait that should end may take before the test gives up on it (a guard, not a synchronisation). */
const GUARD_MS = 10_000;

let engine: Engine;
const hosts: Host[] = [];
const sessions: ComputeSession[] = [];
/** Engine sessions a test closed itself. */
const closedHere = new Set<number>();

beforeAll(() => {
  engine = new (loadAddon().Engine)({ backend: "cpu", threads: 2 });
});

afterAll(async () => {
  for (const s of sessions) if (!closedHere.has(s.engineSession)) engine.closeSession(s.engineSession);
  for (const h of hosts) await h.dispose();
});

/** A session's keys and values per layer, for the reference. */
interface Tracked {
  s: ComputeSession;
  keys: Float32Array[][];
  values: Float32Array[][];
}

let nextId = 0;

/** An attention session with a random prefill on every layer (`reservedPages`: the store's reservation, default all of it). */
async function open(opts: { prefill?: number; reservedPages?: number } = {}): Promise<Tracked> {
  const g = geometryOf(CONFIG, LAYERS);
  const r = retrievalOf(CONFIG);
  const capacityPages = MAX_CONTEXT / P + 1;
  const host = createHost(g, r, capacityPages);
  hosts.push(host);
  const segments = opts.reservedPages === undefined ? host.segments : { ...host.segments, reservedPages: opts.reservedPages };
  const handle = engine.createSession(g, r, segments, false);
  const geometry: ModelGeometry = { layers: LAYERS, queryHeads: CONFIG.qHeads, kvHeads: CONFIG.kvHeads, headDim: CONFIG.headDim, kvDtype: g.kvDtype };
  const attach = { committedPages: [], reservedTokens: MAX_CONTEXT } as unknown as AttachSessionResponse;
  const s = new ComputeSession(`s${nextId++}`, SessionKind.SESSION_KIND_ATTENTION, geometry, r as unknown as RetrievalConfig, MAX_CONTEXT, attach, segments, handle, { kind: "attention" });
  sessions.push(s);
  const t: Tracked = { s, keys: [], values: [] };
  for (let l = 0; l < LAYERS; l++) {
    const n = opts.prefill ?? 20 + Math.floor(rand() * 60);
    const k = randomF32(n * KV, rand);
    const v = randomF32(n * KV, rand);
    await engine.prefill(handle, l, k, v, n);
    s.layerTokens[l] += n;
    t.keys.push([]);
    t.values.push([]);
    for (let i = 0; i < n; i++) {
      t.keys[l].push(k.slice(i * KV, (i + 1) * KV));
      t.values[l].push(v.slice(i * KV, (i + 1) * KV));
    }
  }
  return t;
}

/** One decode item of a session with random q, k, v. */
function item(t: Tracked): DecodeItemOp {
  return { session: t.s, q: randomF32(QD, rand, 2), k: randomF32(KV, rand), v: randomF32(KV, rand), dtype: DType.D_TYPE_FLOAT32 };
}

/** Records an item that ran in its session's history and compares its output with exact attention over it. */
function check(t: Tracked, layer: number, op: DecodeItemOp, out: Float32Array): void {
  t.keys[layer].push(op.k);
  t.values[layer].push(op.v);
  const ref = exactAttention(op.q, t.keys[layer], t.values[layer], CONFIG.qHeads, CONFIG.kvHeads, CONFIG.headDim);
  expect(relError(out, ref), `session ${t.s.id} layer ${layer}`).toBeLessThan(1e-5);
}

/** `p`, or a rejection naming `what` after GUARD_MS. */
async function within<T>(p: Promise<T>, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const guard = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what}: still waiting after ${GUARD_MS} ms`)), GUARD_MS)));
  try {
    return await Promise.race([p, guard]);
  } finally {
    clearTimeout(timer);
  }
}

/** Whether `p` has settled yet (after the microtasks queued so far). */
async function settled(p: Promise<unknown>): Promise<boolean> {
  let done = false;
  p.then(
    () => (done = true),
    () => (done = true),
  );
  await new Promise((r) => setImmediate(r));
  return done;
}

/** The batcher under test, with what it observed: batch sizes, and waits for appends. */
function batcher(eng: Engine = engine) {
  const sizes: number[] = [];
  const waiters: Array<{ pred: () => boolean; resolve: () => void }> = [];
  const b = new AttentionBatcher(eng, 2000, {
    batch: (_layer, size) => sizes.push(size),
    appended: () => {
      for (const w of [...waiters])
        if (w.pred()) {
          waiters.splice(waiters.indexOf(w), 1);
          w.resolve();
        }
    },
  });
  /** Resolves once `pred` holds, checked after each token appended. */
  const until = (pred: () => boolean) => new Promise<void>((resolve) => (pred() ? resolve() : waiters.push({ pred, resolve })));
  return { b, sizes, until };
}

const live = () => new AbortController().signal;

describe(`AttentionBatcher: session locks and failed calls (seed ${seed})`, () => {
  it("a session whose lock is held delays only its own items; they run, exact, once it is released", async () => {
    const { b, until } = batcher();
    const n = 3 + Math.floor(rand() * 3);
    const ts = await Promise.all(Array.from({ length: n }, () => open()));
    const layer = Math.floor(rand() * LAYERS);
    const held = ts[Math.floor(rand() * n)];
    const others = ts.filter((t) => t !== held);
    const partner = others[Math.floor(rand() * others.length)];
    const before = held.s.layerTokens[layer];
    const release = await held.s.lock.acquire();
    // One request holds the held session and a partner (in a random order); each other session has a request of its own.
    const mixedOps = rand() < 0.5 ? [item(held), item(partner)] : [item(partner), item(held)];
    const partnerBefore = partner.s.layerTokens[layer];
    const partnerRan = until(() => partner.s.layerTokens[layer] === partnerBefore + 1);
    const mixed = b.submit(layer, mixedOps, live());
    const alone = others.filter((t) => t !== partner).map((t) => ({ t, op: item(t) }));
    const outs = alone.map(({ op }) => b.submit(layer, [op], live()));
    // Every other session's item runs while the lock is still held.
    const got = await within(Promise.all(outs), "the free sessions' decodes");
    alone.forEach(({ t, op }, i) => check(t, layer, op, got[i][0]));
    await within(partnerRan, "the partner's item of the request that also holds the held session");
    expect(held.s.lock.busy).toBe(true);
    expect(held.s.layerTokens[layer]).toBe(before);
    expect(await settled(mixed)).toBe(false);
    release();
    const mixedOut = await within(mixed, "the held session's item after the release");
    mixedOps.forEach((op, i) => check(op.session === held.s ? held : partner, layer, op, mixedOut[i]));
    expect(held.s.layerTokens[layer]).toBe(before + 1);
    expect(held.s.lock.busy).toBe(false);
  });

  it.each([
    ["cancelled", status.CANCELLED, "call cancelled by the client"],
    ["deadline exceeded", status.DEADLINE_EXCEEDED, "deadline exceeded"],
  ] as const)("a call %s while its item waits for the lock is rejected at once and appends nothing", async (_name, code, message) => {
    const { b } = batcher();
    const [held, free] = await Promise.all([open(), open()]);
    const layer = Math.floor(rand() * LAYERS);
    const before = held.s.layerTokens[layer];
    const release = await held.s.lock.acquire();
    const ctl = new AbortController();
    const waiting = b.submit(layer, [item(held)], ctl.signal);
    const freeOp = item(free);
    check(free, layer, freeOp, (await within(b.submit(layer, [freeOp], live()), "the free session's decode"))[0]);
    expect(await settled(waiting)).toBe(false);
    const reason = new ServiceError(code, message);
    // The deadline as callScope arms it (a timer); a cancellation from the client's side at once.
    if (code === status.DEADLINE_EXCEEDED) setTimeout(() => ctl.abort(reason), 20 + Math.floor(rand() * 30));
    else ctl.abort(reason);
    const t0 = performance.now();
    const err = await within(
      waiting.then(
        () => undefined,
        (e: unknown) => e,
      ),
      "the rejection of the cancelled item",
    );
    const ms = performance.now() - t0;
    expect(err).toBe(reason);
    expect(held.s.lock.busy).toBe(true); // still held: the rejection did not wait for it
    expect(ms).toBeLessThan(1000);
    expect(held.s.layerTokens[layer]).toBe(before);
    release();
    // Nothing reached the engine: the next step attends over the history without the cancelled item.
    const next = item(held);
    check(held, layer, next, (await within(b.submit(layer, [next], live()), "the next decode of the held session"))[0]);
    expect(held.s.layerTokens[layer]).toBe(before + 1);
    expect(held.s.lock.busy).toBe(false);
  });

  it("two requests over the same sessions in opposite orders both complete, each session's items in submission order", async () => {
    const { b, until } = batcher();
    const n = 3 + Math.floor(rand() * 3);
    const ts = await Promise.all(Array.from({ length: n }, () => open()));
    const layer = Math.floor(rand() * LAYERS);
    const order = [...ts].sort(() => rand() - 0.5);
    // One session's lock is held while both requests arrive: both requests' items of the other
    // sessions run meanwhile.
    const held = order[Math.floor(rand() * n)];
    const base = new Map(ts.map((t) => [t, t.s.layerTokens[layer]]));
    const release = await held.s.lock.acquire();
    const first = order.map((t) => ({ t, op: item(t) }));
    const second = [...order].reverse().map((t) => ({ t, op: item(t) }));
    const r1 = b.submit(layer, first.map((x) => x.op), live());
    const r2 = b.submit(layer, second.map((x) => x.op), live());
    const free = ts.filter((t) => t !== held);
    await within(until(() => free.every((t) => t.s.layerTokens[layer] === base.get(t)! + 2)), "both requests' items of the free sessions");
    expect(held.s.layerTokens[layer]).toBe(base.get(held));
    expect(await settled(r1)).toBe(false);
    expect(await settled(r2)).toBe(false);
    release();
    const [o1, o2] = await within(Promise.all([r1, r2]), "both requests");
    // Per session: the first request's item ran first.
    for (const t of ts) {
      const i1 = first.findIndex((x) => x.t === t);
      const i2 = second.findIndex((x) => x.t === t);
      check(t, layer, first[i1].op, o1[i1]);
      check(t, layer, second[i2].op, o2[i2]);
    }
  });

  it("a batch that failed before appending anything runs its other items again, each alone", async () => {
    const { b, sizes } = batcher();
    const layer = Math.floor(rand() * LAYERS);
    const good = await Promise.all([open(), open()]);
    // Refused synchronously by the binding: its engine session is gone.
    const gone = await open();
    engine.closeSession(gone.s.engineSession);
    closedHere.add(gone.s.engineSession);
    // Refused by the engine's own check: a decode would fill a page past the store's reservation (1 page).
    const unreserved = await open({ prefill: 2 * P - 1, reservedPages: 1 });
    for (const bad of [gone, unreserved]) {
      sizes.length = 0;
      const before = [...good, bad].map((t) => t.s.layerTokens[layer]);
      const ops = good.map((t) => ({ t, op: item(t) }));
      const badOp = item(bad);
      const all = [...ops.map(({ op }) => b.submit(layer, [op], live())), b.submit(layer, [badOp], live())];
      const outcomes = await within(Promise.allSettled(all), "the batch with a bad item");
      ops.forEach(({ t, op }, i) => {
        expect(outcomes[i].status).toBe("fulfilled");
        check(t, layer, op, (outcomes[i] as PromiseFulfilledResult<Float32Array[]>).value[0]);
        expect(t.s.layerTokens[layer]).toBe(before[i] + 1);
      });
      const last = outcomes[ops.length];
      expect(last.status).toBe("rejected");
      expect(((last as PromiseRejectedResult).reason as Error).message).toMatch(bad === gone ? /items\[\d+\]\.session \d+ is not open/ : /^items\[\d+\]: session \d+: .*reserv/i);
      expect(bad.s.layerTokens[layer]).toBe(before[ops.length]);
      expect(divergedError(bad.s)).toBeUndefined();
      // The failed batch ran no call to its end; the good items ran in calls of their own.
      expect(sizes).toEqual(good.map(() => 1));
    }
    // The refused session is intact: with the reservation grown, its next step runs, exact.
    engine.reserveStore(unreserved.s.engineSession, MAX_CONTEXT / P + 1);
    const op = item(unreserved);
    check(unreserved, layer, op, (await within(b.submit(layer, [op], live()), "the refused session's next decode"))[0]);
  });

  it("a call that failed after it may have appended marks its sessions: their later calls fail with DATA_LOSS", async () => {
    // The real engine, whose decode throws after it ran (so the tokens are appended).
    const failing: Engine = Object.create(engine, {
      decode: {
        value: async (layer: number, inputs: Parameters<Engine["decode"]>[1]) => {
          await engine.decode(layer, inputs);
          throw new Error(`engine failure after the append (seed ${seed})`);
        },
      },
    });
    const { b } = batcher(failing);
    const n = 2 + Math.floor(rand() * 3);
    const ts = await Promise.all(Array.from({ length: n }, () => open()));
    const layer = Math.floor(rand() * LAYERS);
    const outcomes = await within(Promise.allSettled(ts.map((t) => b.submit(layer, [item(t)], live()))), "the failing batch");
    for (const [i, t] of ts.entries()) {
      expect(outcomes[i].status).toBe("rejected");
      expect(((outcomes[i] as PromiseRejectedResult).reason as Error).message).toMatch(/after the append/);
      const marked = divergedError(t.s);
      expect(marked?.code).toBe(status.DATA_LOSS);
      expect(() => checkDiverged(t.s)).toThrow(marked!);
    }
    // Later decodes of those sessions fail with that error, before any engine call, on a healthy engine too.
    const healthy = batcher();
    const later = await within(Promise.allSettled(ts.map((t) => healthy.b.submit(layer, [item(t)], live()))), "the later decodes");
    later.forEach((o, i) => {
      expect(o.status).toBe("rejected");
      expect((o as PromiseRejectedResult).reason).toBe(divergedError(ts[i].s));
    });
    expect(healthy.sizes).toEqual([]);
    // A session that was not in the failed call is not marked.
    const other = await open();
    const op = item(other);
    check(other, layer, op, (await within(healthy.b.submit(layer, [op], live()), "another session's decode"))[0]);
  });
});
