/**
 * A move of a session that is busy, across real processes (the tiny Qwen2 fixture without an EOS
 * token, so that a turn runs to max_tokens): MoveSession waits for the session's turn, but no
 * longer than the move's deadline (FREEKV_MOVE_TIMEOUT_MS here, the client setting none). It ends
 * with DEADLINE_EXCEEDED while the turn still runs, the session stays whole on this pod, and the
 * turn completes.
 */
import { rmSync } from "node:fs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { credentials, Metadata, status, type ServiceError } from "@grpc/grpc-js";
import { FreeKvClient } from "../../packages/client/src/index.js";
import { MoveSessionRequest, SessionMoveServiceClient } from "../../proto/gen/freekv/v1/compute.js";
import { prng } from "../helpers/prng.js";
import { QUIET, fetchMetrics, metricValue, startTiers, type Tiers } from "../helpers/services.js";
import { tinyModelWithoutEos } from "../helpers/tiny-model.js";

const seed = Number(process.env.FREEKV_TEST_SEED) || (Date.now() ^ (process.pid << 9)) >>> 0;
const rand = prng(seed);
const MOVE_TIMEOUT_MS = 500;

let tiers: Tiers;
let modelDir: string;

beforeAll(async () => {
  modelDir = tinyModelWithoutEos("freekv-move-busy-");
  tiers = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...QUIET, FREEKV_MODEL: modelDir, FREEKV_THREADS: "1", FREEKV_MOVE_TIMEOUT_MS: String(MOVE_TIMEOUT_MS) } });
}, 120_000);

afterAll(async () => {
  await tiers?.stop();
  if (modelDir) rmSync(modelDir, { recursive: true, force: true });
});

describe(`a move of a busy session (seed ${seed})`, () => {
  it("gives up at its deadline while the session's turn runs; the session stays here and the turn completes", async () => {
    const client = new FreeKvClient(tiers.compute.address, { retry: { maxAttempts: 1 } });
    const mover = new SessionMoveServiceClient(tiers.compute.address, credentials.createInsecure());
    try {
      const sid = `busy-${Math.floor(rand() * 1e9)}`;
      await client.createSession({ sessionId: sid, kind: 1, maxContextTokens: 16384 });
      const prompt = { $case: "tokens" as const, value: { ids: Array.from({ length: 16 }, () => Math.floor(rand() * 320)) } };
      const maxTokens = 12_000 + Math.floor(rand() * 2000);
      let turnDone = false;
      const turn = client.generateText({ sessionId: sid, prompt, maxTokens, sampling: { temperature: 0, topP: 0, topK: 0, seed: 0 } }).finally(() => (turnDone = true));
      // The turn holds the session once its first tokens come (its context grows).
      for (let i = 0; i < 200; i++) {
        const got = await client.getSession({ sessionId: sid });
        if (Number(got.session?.contextTokens) > 0) break;
        await new Promise((r) => setTimeout(r, 10));
      }
      const t0 = Date.now();
      // No client deadline: the server's FREEKV_MOVE_TIMEOUT_MS bounds the move. The target is
      // never reached (the move ends before the streams).
      const e = await new Promise<ServiceError | undefined>((resolve) =>
        mover.moveSession(MoveSessionRequest.fromPartial({ sessionId: sid, target: "127.0.0.1:9" }), new Metadata(), (err) => resolve(err ?? undefined)),
      );
      const waited = Date.now() - t0;
      expect(e?.code, e?.details).toBe(status.DEADLINE_EXCEEDED);
      expect(e?.details).toMatch(/deadline passed before the session's turn came/);
      expect(waited).toBeLessThan(MOVE_TIMEOUT_MS + 1500);
      expect(turnDone, "the move should have ended while the turn still ran").toBe(false);
      const m = await fetchMetrics(tiers.compute.metricsPort);
      expect(metricValue(m, "freekv_compute_session_moves_total", 'result="deadline_exceeded"')).toBe(1);
      // The turn completes on this pod, the session whole.
      const r = await turn;
      expect(r.tokenIds.length).toBe(maxTokens);
      const after = await client.getSession({ sessionId: sid });
      expect(Number(after.session?.contextTokens)).toBe(16 + maxTokens - 1); // the last token sampled is fed with the next turn
      await client.closeSession({ sessionId: sid });
    } finally {
      mover.close();
      client.close();
    }
  }, 120_000);
});
