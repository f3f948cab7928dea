/**
 * Chaos, seeded: several named sessions take Generate turns (built-in model, kvstore with
 * FREEKV_KVSTORE_PERSIST so segments survive compute) while compute is SIGKILLed at random
 * moments (mid-turn or between turns) and restarted, and the kvstore is frozen now and then
 * (SIGSTOP for a moment). Invariants, whatever happened:
 * - every call ends with OK or a status a client can act on (UNAVAILABLE, DATA_LOSS, NOT_FOUND
 *   for a session it closed, DEADLINE_EXCEEDED, CANCELLED when the process died under it), never
 *   INTERNAL or UNKNOWN;
 * - a session's context, as GetSession reports it, never shrinks between two observations;
 * - after each restart compute serves again, and every session continues (its next turn is OK);
 * - at the end, closing every session leaves the kvstore with no session and no segment bytes.
 * FREEKV_TEST_SEED replays a run.
 */
import { afterAll, describe, expect, it } from "vitest";
import { status, type ServiceError } from "@grpc/grpc-js";
import { FreeKvClient } from "../../packages/client/src/index.js";
import { healthCheck } from "../../tools/dev/health-probe.js";
import { prng } from "../helpers/prng.js";
import { QUIET, kvstoreClient, startService, startTiers, unary, type ServiceProcess, type Tiers } from "../helpers/services.js";

const seed = Number(process.env.FREEKV_TEST_SEED ?? Date.now() % 1e9);
const rand = prng(seed);
const int = (n: number) => Math.floor(rand() * n);
const ACTIONABLE = new Set([status.OK, status.UNAVAILABLE, status.DATA_LOSS, status.DEADLINE_EXCEEDED, status.CANCELLED, status.FAILED_PRECONDITION]);

describe(`chaos (seed ${seed}, FREEKV_TEST_SEED)`, () => {
  let tiers: Tiers | undefined;
  let compute: ServiceProcess | undefined;
  afterAll(async () => {
    if (tiers?.kvstore.child.exitCode === null) tiers.kvstore.child.kill("SIGCONT");
    await compute?.stop();
    await tiers?.kvstore.stop();
  });

  it("kills and freezes the tiers under load without losing data silently or leaking", { timeout: 300_000 }, async () => {
    tiers = await startTiers({ kvstoreEnv: { ...QUIET, FREEKV_KVSTORE_PERSIST: "1" }, computeEnv: { ...QUIET, FREEKV_THREADS: "1" } });
    compute = tiers.compute;
    const env = { ...QUIET, FREEKV_THREADS: "1", FREEKV_COMPUTE_PORT: "0", FREEKV_COMPUTE_METRICS_PORT: "0", FREEKV_KVSTORE_ADDR: tiers.kvstore.address };
    let client = new FreeKvClient(compute.address, { retry: { maxAttempts: 1 }, defaultDeadlineMs: 30_000 });
    const ids = Array.from({ length: 3 }, (_, i) => `chaos-${seed}-${i}`);
    for (const id of ids) await client.createSession({ sessionId: id, kind: 1, maxContextTokens: 4096 });
    const lastContext = new Map<string, number>(ids.map((id) => [id, 0]));
    const bad: string[] = [];
    const note = (what: string, e: unknown) => {
      const code = (e as ServiceError).code;
      if (!ACTIONABLE.has(code)) bad.push(`${what}: ${status[code] ?? e} ${(e as ServiceError).details ?? (e as Error).message}`);
    };
    const observe = async () => {
      for (const id of ids) {
        const got = await client.getSession({ sessionId: id }).catch((e) => (note(`GetSession ${id}`, e), undefined));
        if (!got?.session) continue;
        const ctx = Number(got.session.contextTokens);
        if (ctx < lastContext.get(id)!) bad.push(`session ${id}: context shrank from ${lastContext.get(id)} to ${ctx}`);
        lastContext.set(id, ctx);
      }
    };
    const restart = async () => {
      client.close();
      compute = await startService("compute", { env, timeoutMs: 60_000 });
      client = new FreeKvClient(compute.address, { retry: { maxAttempts: 1 }, defaultDeadlineMs: 30_000 });
      expect(await healthCheck(compute.address)).toBe("SERVING");
    };
    const turn = (id: string, onChunk?: (n: number) => void) => {
      let n = 0;
      return (async () => {
        for await (const e of client.generate({ sessionId: id, prompt: { $case: "tokens", value: { ids: Array.from({ length: 4 + int(40) }, () => 3 + int(400)) } }, maxTokens: 8 + int(40) }))
          if (e.type === "chunk") onChunk?.(++n);
      })().catch((e) => note(`Generate ${id}`, e));
    };

    // At least two kills and two freezes, in a seeded order among plain rounds.
    const actions = [0, 0, 1, 1, ...Array.from({ length: 6 }, () => int(4))];
    for (let i = actions.length - 1; i > 0; i--) {
      const j = int(i + 1);
      [actions[i], actions[j]] = [actions[j], actions[i]];
    }
    let kills = 0;
    for (const action of actions) {
      if (action === 0) {
        // SIGKILL compute in the middle of a turn, then restart it.
        const victim = compute!;
        const t = turn(ids[int(ids.length)], (n) => n === 3 && victim.child.kill("SIGKILL"));
        await t;
        if (victim.child.exitCode === null && victim.child.signalCode === null) victim.child.kill("SIGKILL");
        await victim.exited;
        kills++;
        await restart();
      } else if (action === 1) {
        // Freeze the kvstore for a moment while turns run.
        const ts = ids.map((id) => turn(id));
        tiers.kvstore.child.kill("SIGSTOP");
        await new Promise((r) => setTimeout(r, 300 + int(700)));
        tiers.kvstore.child.kill("SIGCONT");
        await Promise.all(ts);
      } else {
        await Promise.all(ids.map((id) => turn(id)));
      }
      await observe();
    }
    // Every session continues: its next turn is OK (after a kvstore freeze the commit retry may lag: a few tries).
    for (const id of ids) {
      let ok = false;
      for (let i = 0; i < 20 && !ok; i++) {
        ok = await client
          .generateText({ sessionId: id, prompt: { $case: "tokens", value: { ids: [5, 6, 7] } }, maxTokens: 4 })
          .then(() => true)
          .catch((e) => (note(`final Generate ${id}`, e), new Promise<boolean>((r) => setTimeout(() => r(false), 250))));
      }
      expect(ok, `session ${id} continues`).toBe(true);
    }
    await observe();
    expect(kills).toBeGreaterThanOrEqual(2);
    expect(bad).toEqual([]);
    for (const id of ids) await client.closeSession({ sessionId: id });
    client.close();
    const kv = kvstoreClient(tiers.kvstore.address);
    const stats = await unary<{ sessions: number; segmentBytes: number }>(kv, "getStats", {});
    kv.close();
    expect(stats.sessions).toBe(0);
    expect(Number(stats.segmentBytes)).toBe(0);
  });
});
