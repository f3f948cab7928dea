/**
 * Failed page commits: the compute tier's committed pages advance only when the kvstore
 * acknowledges; a failure degrades the session (the next commit point throws UNAVAILABLE, the
 * failure is counted), and the retry sends the range from the first uncommitted page, so the
 * kvstore never sees a gap. Random append sequences against a kvstore that fails at random.
 */
import { status } from "@grpc/grpc-js";
import { describe, expect, it } from "vitest";
import { createLogger } from "../../services/common/log.js";
import { resolveRetrieval } from "../../services/common/retrieval.js";
import { ServiceError } from "../../services/common/errors.js";
import { SessionManager } from "../../services/compute/sessions/manager.js";
import { ComputeSession } from "../../services/compute/sessions/session.js";
import type { AttachSessionResponse, CommitPagesRequest, CommitPagesResponse } from "../../proto/gen/freekv/v1/kvstore.js";
import type { KvStoreClient } from "../../services/compute/kvstore-client.js";
import type { Engine } from "../../native/binding.js";
import { prng } from "../helpers/prng.js";

const log = createLogger("test", "silent");
const LAYERS = 4;
const P = 8;

/** A kvstore that applies the real gap rule and refuses while `down`. */
function setup() {
  const committed = new Array<number>(LAYERS).fill(0);
  let metadata = Buffer.alloc(0);
  const state = { down: false, calls: 0, refused: 0 };
  const kvstore = {
    async commit(req: CommitPagesRequest): Promise<CommitPagesResponse> {
      state.calls++;
      await new Promise((r) => setImmediate(r));
      if (state.down) {
        state.refused++;
        throw Object.assign(new Error("14 UNAVAILABLE: No connection established"), { code: status.UNAVAILABLE, details: "No connection established" });
      }
      const entries = req.layers.length ? req.layers : [{ layer: req.layer, firstPage: req.firstPage, count: req.count, checksums: req.checksums }];
      for (const e of entries) if (e.firstPage > committed[e.layer]) throw Object.assign(new Error("gap"), { code: status.FAILED_PRECONDITION, details: `layer ${e.layer}: first_page ${e.firstPage} leaves a gap` });
      for (const e of entries) committed[e.layer] = Math.max(committed[e.layer], e.firstPage + e.count);
      if (req.metadata.length) metadata = Buffer.from(req.metadata);
      return { committedPages: Math.min(...committed), layerCommittedPages: [] };
    },
  } as unknown as KvStoreClient;
  const filled = new Array<number>(LAYERS).fill(0);
  const engine = { filledPages: (_s: number, layer: number) => filled[layer] } as unknown as Engine;
  let failures = 0;
  const mgr = new SessionManager({
    log,
    kvstore,
    engine,
    defaultMaxContextTokens: 4096,
    maxContextLimit: 4096,
    commitChecksums: false,
    backend: "cpu",
    defaultKvDtype: 1 as never,
    onCommitFailure: () => failures++,
  });
  const retrieval = resolveRetrieval({ pageSize: P, sinkTokens: P, windowTokens: P, selectTokens: 2 * P } as never, LAYERS);
  const s = new ComputeSession("s1", 1 as never, { layers: LAYERS, queryHeads: 4, kvHeads: 2, headDim: 16, kvDtype: 1 } as never, retrieval, 4096, { committedPages: [] } as unknown as AttachSessionResponse, undefined, 7, { kind: "model" });
  const append = (tokens: number) => {
    s.layerTokens.fill(tokens);
    filled.fill(Math.floor(tokens / P));
  };
  return { mgr, s, state, committed, filled, append, failures: () => failures, metadata: () => metadata };
}

describe("failed page commits", () => {
  it("are reported at the next commit point and retried from the first uncommitted page (random outages)", async () => {
    for (const seed of [1, 2, 3, 4, 5]) {
      const rand = prng(seed * 7919);
      const { mgr, s, state, committed, append, failures } = setup();
      let tokens = 0;
      let surfaced = 0;
      for (let step = 0; step < 200; step++) {
        if (rand() < 0.08) state.down = !state.down;
        tokens += 1 + Math.floor(rand() * 12);
        append(tokens);
        const wasDegraded = s.commitError !== undefined;
        try {
          mgr.commitProgressAll(s);
          expect(wasDegraded).toBe(false);
        } catch (e) {
          // Only a session whose latest commit failed refuses, and with UNAVAILABLE.
          expect(wasDegraded).toBe(true);
          expect(e).toBeInstanceOf(ServiceError);
          expect((e as ServiceError).code).toBe(status.UNAVAILABLE);
          surfaced++;
        }
        if (rand() < 0.5) await s.commitChain;
        // What compute counts as committed never runs ahead of the kvstore.
        for (let l = 0; l < LAYERS; l++) expect(s.committedPages[l]).toBeLessThanOrEqual(committed[l]);
      }
      await s.commitChain;
      expect(state.refused).toBeGreaterThan(0);
      expect(failures()).toBe(state.refused);
      expect(surfaced).toBeGreaterThan(0);
      // Back up: the next commit point fills every gap.
      state.down = false;
      append(tokens + 1);
      try {
        mgr.commitProgressAll(s);
      } catch {
        /* the last failure is reported once more; the retry is queued */
      }
      await s.commitChain;
      const full = Math.floor((tokens + 1) / P);
      expect(committed).toEqual(new Array(LAYERS).fill(full));
      expect(s.committedPages).toEqual(committed);
      expect(s.commitError).toBeUndefined();
      expect(() => mgr.commitProgressAll(s)).not.toThrow();
    }
  });

  it("retry on their own once the kvstore is back, metadata included", async () => {
    const { mgr, s, state, committed, append, metadata } = setup();
    append(5 * P + 3);
    state.down = true;
    s.metadata.generate = { pendingToken: 42 };
    await expect(mgr.commitMetadata(s)).rejects.toMatchObject({ code: status.UNAVAILABLE });
    expect(s.committedPages).toEqual([0, 0, 0, 0]);
    state.down = false;
    // The retry timer (250 ms after the first failure) commits pages and metadata without a new commit point.
    for (let i = 0; i < 100 && s.commitError; i++) await new Promise((r) => setTimeout(r, 20));
    await s.commitChain;
    expect(s.commitError).toBeUndefined();
    expect(committed).toEqual([5, 5, 5, 5]);
    const m = JSON.parse(metadata().toString("utf8"));
    expect(m).toEqual({ kind: "model", generate: { pendingToken: 42 }, contextTokens: 5 * P + 3 });
  });
});
