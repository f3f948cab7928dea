/**
 * A named session whose creation answer was lost: the kvstore made it, the compute heard
 * DEADLINE_EXCEEDED. The compute releases it in the background with the creation token it attached
 * with, so the kvstore frees it only if that call made it and nobody opened it since: a session the
 * client (or another pod) went on to use stays. A real kvstore store in process behind a client
 * whose attach answers are dropped.
 */
import { status } from "@grpc/grpc-js";
import { afterEach, describe, expect, it } from "vitest";
import { createLogger } from "../../services/common/log.js";
import { MemoryDirectory } from "../../services/kvstore/directory.js";
import { KvStore } from "../../services/kvstore/store.js";
import { SessionManager } from "../../services/compute/sessions/manager.js";
import { SessionKind } from "../../proto/gen/freekv/v1/compute.js";
import type { KvStoreClient } from "../../services/compute/kvstore-client.js";
import type { Engine } from "../../native/binding.js";

const log = createLogger("test", "silent");
const G = { layers: 2, queryHeads: 4, kvHeads: 2, headDim: 16, kvDtype: 1 };
const R = { pageSize: 16, sinkTokens: 16, windowTokens: 16, selectTokens: 32 };
const stores: KvStore[] = [];
const managers: SessionManager[] = [];

afterEach(async () => {
  for (const m of managers.splice(0)) await m.shutdown();
  for (const s of stores.splice(0)) await s.shutdown(false);
});

function setup() {
  const store = new KvStore(new MemoryDirectory(), 1 << 30, log);
  stores.push(store);
  // next: the next attach's answer is lost; before: the kvstore never sees that call; gate: the
  // next attach waits for it first (a slow kvstore).
  // old: GetStats answers as a kvstore older than creation tokens (no features).
  // statsDown: GetStats does not answer.
  const lose: { next: boolean; before?: boolean; gate?: Promise<void>; old?: boolean; statsDown?: boolean } = { next: true };
  const releases: { id: string; token: string }[] = [];
  const kvstore = {
    async attach(req: Parameters<KvStore["attach"]>[0]) {
      const gate = lose.gate;
      lose.gate = undefined;
      if (gate) await gate;
      const dropBefore = lose.next && lose.before;
      const r = dropBefore ? undefined : await store.attach(req);
      if (lose.next) {
        lose.next = false;
        lose.before = false;
        throw Object.assign(new Error("4 DEADLINE_EXCEEDED: Deadline exceeded"), { code: status.DEADLINE_EXCEEDED, details: "Deadline exceeded" });
      }
      return r!;
    },
    async stats() {
      if (lose.statsDown) throw Object.assign(new Error("14 UNAVAILABLE: No connection established"), { code: status.UNAVAILABLE });
      const st = store.stats();
      return lose.old ? { ...st, features: [] } : st;
    },
    async release(id: string, _signal?: AbortSignal, token = "") {
      releases.push({ id, token });
      try {
        return { released: await store.release(id, token) };
      } catch (e) {
        throw Object.assign(new Error((e as Error).message), { code: (e as { code?: number }).code, details: (e as Error).message });
      }
    },
  } as unknown as KvStoreClient;
  const mgr = new SessionManager({
    log,
    kvstore,
    engine: {} as Engine,
    defaultMaxContextTokens: 256,
    maxContextLimit: 4096,
    commitChecksums: false,
    backend: "cpu",
    defaultKvDtype: 1 as never,
    releaseRetryMs: 20,
  });
  managers.push(mgr);
  const create = (sessionId: string) => mgr.create({ sessionId, kind: SessionKind.SESSION_KIND_ATTENTION, geometry: G as never, retrieval: R as never, maxContextTokens: 256 });
  const settle = async () => {
    for (let i = 0; i < 200 && mgr.releasesPending > 0; i++) await new Promise((r) => setTimeout(r, 10));
  };
  return { store, mgr, lose, releases, create, settle };
}

describe("a named session whose creation answer was lost", () => {
  it("is released at the kvstore in the background when nobody opened it", async () => {
    const { store, mgr, releases, create, settle } = setup();
    await expect(create("lost-1")).rejects.toMatchObject({ code: status.DEADLINE_EXCEEDED });
    // The kvstore made it; the compute did not hear so.
    expect(store.list()).toEqual(["lost-1"]);
    expect(mgr.releasesPending).toBe(1);
    await settle();
    expect(mgr.releasesPending).toBe(0);
    expect(store.list()).toEqual([]);
    // Released with the token of the lost call, never unconditionally.
    expect(releases.length).toBeGreaterThan(0);
    for (const r of releases) expect(r.token).toMatch(/^[0-9a-f-]{36}$/);
  });

  it("stays when someone opened it since (a re-attach), and when the kvstore had it before", async () => {
    const { store, mgr, lose, create, settle } = setup();
    await expect(create("lost-2")).rejects.toMatchObject({ code: status.DEADLINE_EXCEEDED });
    // Opened before the background release runs (another pod's Generate on the name, say).
    await store.attach({ sessionId: "lost-2" } as never);
    await settle();
    expect(mgr.releasesPending).toBe(0);
    expect(store.list()).toEqual(["lost-2"]);

    // A session the kvstore already held: this creation's answer (created false) is lost; its
    // token is not the one that made it, so it stays.
    await store.attach({ sessionId: "held", geometry: G as never, retrieval: R as never, maxContextTokens: 256, metadata: Buffer.from("{}") });
    lose.next = true;
    await expect(create("held")).rejects.toMatchObject({ code: status.DEADLINE_EXCEEDED });
    expect(mgr.releasesPending).toBe(1);
    await settle();
    expect(mgr.releasesPending).toBe(0);
    expect(store.list().sort()).toEqual(["held", "lost-2"]);
  });

  it("is still released after a retry of the same name was answered ALREADY_EXISTS while the release waited", async () => {
    const { store, mgr, lose, create, settle } = setup();
    await expect(create("lost-3")).rejects.toMatchObject({ code: status.DEADLINE_EXCEEDED });
    // The client retries at once; the kvstore is slow, so background rounds run meanwhile.
    let open!: () => void;
    lose.gate = new Promise<void>((r) => (open = r));
    const retry = create("lost-3");
    await new Promise((r) => setTimeout(r, 100));
    expect(mgr.releasesPending).toBe(1);
    expect(store.list()).toEqual(["lost-3"]);
    open();
    await expect(retry).rejects.toMatchObject({ code: status.ALREADY_EXISTS });
    await settle();
    expect(mgr.releasesPending).toBe(0);
    expect(store.list()).toEqual([]);
  });

  it("is kept, with no release sent, when the kvstore does not honour creation tokens", async () => {
    const { store, mgr, lose, releases, create, settle } = setup();
    lose.old = true;
    await expect(create("lost-5")).rejects.toMatchObject({ code: status.DEADLINE_EXCEEDED });
    expect(mgr.releasesPending).toBe(1);
    await settle();
    expect(mgr.releasesPending).toBe(0);
    // Such a kvstore would have ignored the token and freed the session whoever used it since.
    expect(releases).toEqual([]);
    expect(store.list()).toEqual(["lost-5"]);
  });

  it("waits while the kvstore cannot say whether it honours creation tokens, then releases it", async () => {
    const { store, mgr, lose, releases, create, settle } = setup();
    lose.statsDown = true;
    await expect(create("lost-6")).rejects.toMatchObject({ code: status.DEADLINE_EXCEEDED });
    await new Promise((r) => setTimeout(r, 120)); // several rounds of 20 ms
    expect(mgr.releasesPending).toBe(1);
    expect(releases).toEqual([]);
    expect(store.list()).toEqual(["lost-6"]);
    lose.statsDown = false;
    await settle();
    expect(mgr.releasesPending).toBe(0);
    expect(store.list()).toEqual([]);
  });

  it("tries the token of every lost creation: the one whose call made the session releases it", async () => {
    const { store, mgr, lose, releases, create, settle } = setup();
    // The first call never reached the kvstore; the retry made the session and lost its answer too.
    lose.before = true;
    await expect(create("lost-4")).rejects.toMatchObject({ code: status.DEADLINE_EXCEEDED });
    lose.next = true;
    await expect(create("lost-4")).rejects.toMatchObject({ code: status.DEADLINE_EXCEEDED });
    expect(store.list()).toEqual(["lost-4"]);
    await settle();
    expect(mgr.releasesPending).toBe(0);
    expect(store.list()).toEqual([]);
    expect(new Set(releases.map((r) => r.token)).size).toBe(2);
  });
});
