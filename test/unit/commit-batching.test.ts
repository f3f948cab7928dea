/** The compute tier's page commits: every layer of a step in one CommitPages call. */
import { describe, expect, it } from "vitest";
import { createLogger } from "../../services/common/log.js";
import { resolveRetrieval } from "../../services/common/retrieval.js";
import { SessionManager } from "../../services/compute/sessions/manager.js";
import { ComputeSession } from "../../services/compute/sessions/session.js";
import type { AttachSessionResponse, CommitPagesRequest, CommitPagesResponse } from "../../proto/gen/freekv/v1/kvstore.js";
import type { KvStoreClient } from "../../services/compute/kvstore-client.js";

const log = createLogger("test", "silent");
const LAYERS = 5;
const P = 16;

function setup() {
  const calls: CommitPagesRequest[] = [];
  const kvstore = {
    async commit(req: CommitPagesRequest): Promise<CommitPagesResponse> {
      calls.push(structuredClone(req));
      const each = req.layers.map((e) => e.firstPage + e.count);
      return req.layers.length ? { committedPages: Math.min(...each), layerCommittedPages: each } : { committedPages: req.firstPage + req.count, layerCommittedPages: [] };
    },
  } as unknown as KvStoreClient;
  const mgr = new SessionManager({ log, kvstore, engine: undefined, defaultMaxContextTokens: 1024, maxContextLimit: 4096, commitChecksums: false, backend: "cpu", defaultKvDtype: 1 as never });
  const retrieval = resolveRetrieval({ pageSize: P, sinkTokens: P, windowTokens: P, selectTokens: 2 * P, denseLayers: [1] } as never, LAYERS);
  const attach = { committedPages: [] } as unknown as AttachSessionResponse;
  const s = new ComputeSession("s1", 2 as never, { layers: LAYERS, queryHeads: 4, kvHeads: 2, headDim: 16, kvDtype: 1 } as never, retrieval, 1024, attach, undefined, undefined, {});
  return { calls, mgr, s };
}

describe("page commits from the compute tier", () => {
  it("commit every offloading layer that filled pages in one call, and nothing when none filled", async () => {
    const { calls, mgr, s } = setup();
    s.layerTokens.fill(2 * P + 7);
    mgr.commitProgressAll(s);
    await s.commitChain;
    expect(calls).toHaveLength(1);
    expect(calls[0]).toMatchObject({ sessionId: "s1", layer: 0, firstPage: 0, count: 0, checksums: [], contextTokens: 2 * P + 7 });
    // Layer 1 is dense (no pages offloaded); the others committed pages [0, 2).
    expect(calls[0].layers).toEqual([0, 2, 3, 4].map((layer) => ({ layer, firstPage: 0, count: 2, checksums: [] })));
    s.layerTokens.fill(3 * P - 1);
    mgr.commitProgressAll(s);
    await s.commitChain;
    expect(calls).toHaveLength(1);
    s.layerTokens.fill(3 * P);
    mgr.commitProgressAll(s);
    await s.commitChain;
    expect(calls).toHaveLength(2);
    expect(calls[1].layers.map((e) => [e.layer, e.firstPage, e.count])).toEqual([[0, 2, 1], [2, 2, 1], [3, 2, 1], [4, 2, 1]]);
    expect(s.commitError).toBeUndefined();
  });

  it("a single layer goes as a plain single-layer request", async () => {
    const { calls, mgr, s } = setup();
    s.layerTokens[3] = P + 1;
    mgr.commitProgress(s, 3);
    await s.commitChain;
    expect(calls).toHaveLength(1);
    expect(calls[0]).toMatchObject({ sessionId: "s1", layer: 3, firstPage: 0, count: 1, checksums: [], contextTokens: P + 1, layers: [] });
    expect(calls[0].metadata.length).toBe(0);
  });
});
