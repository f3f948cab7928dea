/** The compute tier's page commits: the pages the engine reports filled, every layer of a step in
 *  one CommitPages call. */
import { describe, expect, it } from "vitest";
import { createLogger } from "../../services/common/log.js";
import { resolveRetrieval } from "../../services/common/retrieval.js";
import { SessionManager } from "../../services/compute/sessions/manager.js";
import { ComputeSession } from "../../services/compute/sessions/session.js";
import type { AttachSessionResponse, CommitPagesRequest, CommitPagesResponse } from "../../proto/gen/freekv/v1/kvstore.js";
import type { KvStoreClient } from "../../services/compute/kvstore-client.js";
import type { Engine } from "../../native/binding.js";

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
  // The engine's answer per layer (full pages offloaded), set by each test.
  const filled = new Array<number>(LAYERS).fill(0);
  const engine = { filledPages: (_s: number, layer: number) => filled[layer] } as unknown as Engine;
  const mgr = new SessionManager({ log, kvstore, engine, defaultMaxContextTokens: 1024, maxContextLimit: 4096, commitChecksums: false, backend: "cpu", defaultKvDtype: 1 as never });
  const retrieval = resolveRetrieval({ pageSize: P, sinkTokens: P, windowTokens: P, selectTokens: 2 * P, denseLayers: [1] } as never, LAYERS);
  const attach = { committedPages: [] } as unknown as AttachSessionResponse;
  const s = new ComputeSession("s1", 2 as never, { layers: LAYERS, queryHeads: 4, kvHeads: 2, headDim: 16, kvDtype: 1 } as never, retrieval, 1024, attach, undefined, 7, { kind: "attention" });
  /** `tokens` appended to every layer; the engine has offloaded their full pages. */
  const append = (tokens: number) => {
    s.layerTokens.fill(tokens);
    filled.fill(Math.floor(tokens / P));
  };
  return { calls, mgr, s, filled, append };
}

describe("page commits from the compute tier", () => {
  it("commit every offloading layer that filled pages in one call, and nothing when none filled", async () => {
    const { calls, mgr, s, append } = setup();
    append(2 * P + 7);
    mgr.commitProgressAll(s);
    await s.commitChain;
    expect(calls).toHaveLength(1);
    expect(calls[0]).toMatchObject({ sessionId: "s1", layer: 0, firstPage: 0, count: 0, checksums: [], contextTokens: 2 * P + 7 });
    // Layer 1 is dense (no pages offloaded); the others committed pages [0, 2).
    expect(calls[0].layers).toEqual([0, 2, 3, 4].map((layer) => ({ layer, firstPage: 0, count: 2, checksums: [] })));
    append(3 * P - 1);
    mgr.commitProgressAll(s);
    await s.commitChain;
    expect(calls).toHaveLength(1);
    append(3 * P);
    mgr.commitProgressAll(s);
    await s.commitChain;
    expect(calls).toHaveLength(2);
    expect(calls[1].layers.map((e) => [e.layer, e.firstPage, e.count])).toEqual([[0, 2, 1], [2, 2, 1], [3, 2, 1], [4, 2, 1]]);
    expect(s.commitError).toBeUndefined();
  });

  it("a single layer goes as a plain single-layer request", async () => {
    const { calls, mgr, s, filled } = setup();
    s.layerTokens[3] = P + 1;
    filled[3] = 1;
    mgr.commitProgress(s, 3);
    await s.commitChain;
    expect(calls).toHaveLength(1);
    expect(calls[0]).toMatchObject({ sessionId: "s1", layer: 3, firstPage: 0, count: 1, checksums: [], contextTokens: P + 1, layers: [] });
    expect(calls[0].metadata.length).toBe(0);
  });

  it("commits only what the engine reports offloaded, not what the token count implies", async () => {
    const { calls, mgr, s, filled } = setup();
    // Every layer holds two full pages of tokens, but layer 0's second offload is not complete.
    s.layerTokens.fill(2 * P);
    filled.fill(2);
    filled[0] = 1;
    mgr.commitProgressAll(s);
    await s.commitChain;
    expect(calls[0].layers.map((e) => [e.layer, e.firstPage, e.count])).toEqual([[0, 0, 1], [2, 0, 2], [3, 0, 2], [4, 0, 2]]);
    filled[0] = 2;
    mgr.commitProgressAll(s);
    await s.commitChain;
    expect(calls).toHaveLength(2);
    expect(calls[1]).toMatchObject({ layer: 0, firstPage: 1, count: 1, layers: [] });
  });
});
