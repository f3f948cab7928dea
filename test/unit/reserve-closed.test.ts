/**
 * A turn's reservation that the kvstore answers NOT_FOUND for a session closed meanwhile (its
 * release reached the kvstore first) rejects with the session's NOT_FOUND, never with nothing:
 * the session is gone, not lost, and the caller must get an error to send.
 */
import { status } from "@grpc/grpc-js";
import { describe, expect, it } from "vitest";
import { createLogger } from "../../services/common/log.js";
import { resolveRetrieval } from "../../services/common/retrieval.js";
import { SessionManager } from "../../services/compute/sessions/manager.js";
import { ComputeSession } from "../../services/compute/sessions/session.js";
import type { AttachSessionResponse } from "../../proto/gen/freekv/v1/kvstore.js";
import type { KvStoreClient } from "../../services/compute/kvstore-client.js";
import type { Engine } from "../../native/binding.js";
import { prng } from "../helpers/prng.js";

const seed = Number(process.env.FREEKV_TEST_SEED) || (Date.now() ^ (process.pid << 12)) >>> 0;
const rand = prng(seed);

/** A manager over `kvstore` (nothing else is reached by a reservation), and a model session `id` of pages of `P`. */
function setup(kvstore: object, id: string, P: number) {
  const mgr = new SessionManager({
    log: createLogger("test", "silent"),
    kvstore: kvstore as unknown as KvStoreClient,
    engine: {} as unknown as Engine,
    defaultMaxContextTokens: 4096,
    maxContextLimit: 4096,
    commitChecksums: false,
    backend: "cpu",
    defaultKvDtype: 1 as never,
  });
  const retrieval = resolveRetrieval({ pageSize: P, sinkTokens: P, windowTokens: P, selectTokens: 2 * P } as never, 2);
  const s = new ComputeSession(id, 1 as never, { layers: 2, queryHeads: 4, kvHeads: 2, headDim: 16, kvDtype: 1 } as never, retrieval, 4096, { committedPages: [] } as unknown as AttachSessionResponse, undefined, 7, { kind: "model" });
  return { mgr, s };
}

describe(`a reservation for a session closed meanwhile (seed ${seed})`, () => {
  for (const closed of [true, false]) {
    it(closed ? "closed: rejects with NOT_FOUND naming the session" : "not closed: the session is marked lost (DATA_LOSS)", async () => {
      const id = `s-${Math.floor(rand() * 1e9).toString(36)}`;
      const { mgr, s } = setup(
        {
          async reserve(): Promise<never> {
            throw Object.assign(new Error(`5 NOT_FOUND: session "${id}" is not attached`), { code: status.NOT_FOUND, details: `session "${id}" is not attached` });
          },
        },
        id,
        8 << Math.floor(rand() * 3),
      );
      s.closed = closed;
      const err = await mgr.reserve(s, 64 + Math.floor(rand() * 1000)).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(Error);
      const e = err as Error & { code?: number };
      expect(e.code).toBe(closed ? status.NOT_FOUND : status.DATA_LOSS);
      expect(e.message).toContain(id);
    });
  }

  it("moved to another pod while the reservation was answered: the redirect there, not NOT_FOUND", async () => {
    const id = `s-${Math.floor(rand() * 1e9).toString(36)}`;
    const reserved = 64 + Math.floor(rand() * 1000);
    const { mgr, s } = setup({ reserve: async () => ({ reservedTokens: reserved }) }, id, 8);
    // What a finished move leaves: the session closed here, its new owner remembered.
    s.closed = true;
    const owner = `10.0.0.${1 + Math.floor(rand() * 250)}:50051`;
    (mgr as unknown as { moved: Map<string, string> }).moved.set(id, owner);
    const err = (await mgr.reserve(s, reserved).then(
      () => undefined,
      (e: unknown) => e,
    )) as (Error & { code?: number }) | undefined;
    expect(err?.code).toBe(status.FAILED_PRECONDITION);
    expect(err?.message).toContain(owner);
  });
});
