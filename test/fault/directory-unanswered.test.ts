/**
 * Redis directories that do not answer, and shutdowns with work in flight, across real processes.
 * The kvstore's session directory and compute's session owners reach the Redis at 127.0.0.1:6379
 * through a TCP proxy of this test (a prefix of this run) that can freeze (it holds every byte,
 * both ways, and closes nothing: a frozen server, or a partition that drops packets) or go down
 * (it cuts every connection and refuses new ones).
 *
 * - Frozen: every command fails after its timeout instead of waiting forever: a CreateSession is
 *   answered UNAVAILABLE within seconds, and both processes drain and exit 0 on SIGTERM.
 * - A kvstore stopped while an AttachSession still commits its memory leaves none of its segments
 *   in /dev/shm.
 * - A CloseSession whose release failed (the directory down) is released once the kvstore answers
 *   again, even when a CreateSession of the same id was in flight when the release was retried.
 *
 * Skipped, saying so, without Redis.
 */
import { connect, createServer, type Server, type Socket } from "node:net";
import { readdirSync } from "node:fs";
import { afterAll, describe, expect, it } from "vitest";
import { Metadata, status, type ServiceError } from "@grpc/grpc-js";
import { Redis } from "ioredis";
import { loadAddon } from "../../native/binding.js";
import { AttachSessionRequest } from "../../proto/gen/freekv/v1/kvstore.js";
import { prng } from "../helpers/prng.js";
import { ATTENTION, QUIET, computeClient, fetchMetrics, kvstoreClient, metricValue, startService, startTiers, unary, type ServiceProcess, type Tiers, redisUp } from "../helpers/services.js";

const up = await redisUp();
if (!up) console.warn("directory-unanswered tests skipped: no Redis answers PING at 127.0.0.1:6379");

const seed = Number(process.env.FREEKV_TEST_SEED) || (Date.now() ^ (process.pid << 9)) >>> 0;
const rand = prng(seed);
const prefix = `freekv-unanswered-${process.pid}-${Date.now()}:`;
const G = { layers: 2, queryHeads: 4, kvHeads: 2, headDim: 16, kvDtype: 1 };
const R = { pageSize: 16, sinkTokens: 16, windowTokens: 16, selectTokens: 64 };

/** A proxy to the Redis at 127.0.0.1:6379 that can freeze or go down (see the file's comment). */
class RedisProxy {
  private server!: Server;
  private readonly sockets = new Set<Socket>();
  private readonly held: Array<() => void> = [];
  private state: "open" | "frozen" | "down" = "open";
  port = 0;

  async listen(): Promise<void> {
    this.server = createServer((c) => {
      if (this.state === "down") return void c.destroy();
      const upstream = connect(6379, "127.0.0.1");
      this.sockets.add(c).add(upstream);
      const pass = (from: Socket, to: Socket) =>
        from.on("data", (d) => {
          if (this.state === "frozen") this.held.push(() => to.write(d));
          else to.write(d);
        });
      pass(c, upstream);
      pass(upstream, c);
      const end = () => (c.destroy(), upstream.destroy(), this.sockets.delete(c), this.sockets.delete(upstream));
      for (const s of [c, upstream]) s.on("error", end).on("close", end);
    });
    await new Promise<void>((resolve) => this.server.listen(0, "127.0.0.1", () => resolve()));
    this.port = (this.server.address() as { port: number }).port;
  }

  get url(): string {
    return `redis://127.0.0.1:${this.port}/0`;
  }

  freeze(): void {
    this.state = "frozen";
  }

  down(): void {
    this.state = "down";
    this.held.length = 0;
    for (const s of this.sockets) s.destroy();
  }

  open(): void {
    this.state = "open";
    for (const f of this.held.splice(0)) f();
  }

  async close(): Promise<void> {
    this.down();
    await new Promise((r) => this.server.close(r));
  }
}

/** Segments of the kvstore process `pid` in /dev/shm. */
const segmentsOfPid = (pid: number) => readdirSync("/dev/shm").filter((f) => f.startsWith(`freekv-kv-${pid}-`));

const exitWithin = (p: ServiceProcess, ms: number) =>
  Promise.race([p.exited, new Promise<"still running">((r) => setTimeout(r, ms, "still running"))]);

afterAll(async () => {
  if (!up) return;
  const r = new Redis("redis://127.0.0.1:6379/0");
  const keys = await r.keys(`${prefix}*`);
  if (keys.length) await r.del(...keys);
  r.disconnect();
});

describe.skipIf(!up)(`Redis that does not answer, and shutdowns with work in flight (seed ${seed})`, () => {
  it("a frozen Redis fails commands after their timeout: calls are answered, and both processes drain and exit 0", async () => {
    const proxy = new RedisProxy();
    await proxy.listen();
    const port = 20000 + Math.floor(rand() * 20000);
    const tiers: Tiers = await startTiers({
      kvstoreEnv: { ...QUIET, FREEKV_DIRECTORY: proxy.url, FREEKV_DIRECTORY_PREFIX: prefix },
      computeEnv: { ...QUIET, FREEKV_SESSION_OWNERS: proxy.url, FREEKV_SESSION_OWNERS_PREFIX: prefix, FREEKV_ADVERTISE_ADDRESS: `127.0.0.1:${port}` },
    });
    const compute = computeClient(tiers.compute.address);
    try {
      const id = () => `frozen-${Math.floor(rand() * 1e9)}`;
      await unary(compute, "createSession", { sessionId: id(), kind: ATTENTION, geometry: G, retrieval: R, maxContextTokens: 256 });
      proxy.freeze();
      // Answered within a few command timeouts, not held for as long as Redis stays frozen.
      let t0 = Date.now();
      const created = await unary(compute, "createSession", { sessionId: id(), kind: ATTENTION, geometry: G, retrieval: R, maxContextTokens: 256 }, 20_000).catch((e: ServiceError) => e);
      expect((created as ServiceError).code, (created as ServiceError).details).toBe(status.UNAVAILABLE);
      expect(Date.now() - t0).toBeLessThan(10_000);
      t0 = Date.now();
      const got = await unary(compute, "getSession", { sessionId: id() }, 20_000).catch((e: ServiceError) => e);
      expect((got as ServiceError).code).toBe(status.NOT_FOUND);
      expect(Date.now() - t0).toBeLessThan(6_000);
      // Both drain with Redis still frozen.
      tiers.compute.child.kill("SIGTERM");
      tiers.kvstore.child.kill("SIGTERM");
      const [c, k] = await Promise.all([exitWithin(tiers.compute, 15_000), exitWithin(tiers.kvstore, 15_000)]);
      expect(c).toEqual({ code: 0, signal: null });
      expect(k).toEqual({ code: 0, signal: null });
      expect(segmentsOfPid(tiers.kvstore.pid)).toEqual([]);
    } finally {
      compute.close();
      proxy.open();
      await tiers.stop().catch(() => undefined);
      await proxy.close();
    }
  }, 60_000);

  it("a kvstore stopped while an AttachSession commits its memory leaves none of its segments behind", async () => {
    // One thread commits the memory by write faults: a reservation of a gigabyte or so takes
    // seconds, longer than the drain's grace period and its wait for cancelled calls.
    const kv = await startService("kvstore", {
      env: { ...QUIET, FREEKV_KVSTORE_PORT: "0", FREEKV_KVSTORE_METRICS_PORT: "0", FREEKV_KVSTORE_COMMIT_THREADS: "1", FREEKV_SHUTDOWN_GRACE_MS: "100" },
    });
    const client = kvstoreClient(kv.address);
    try {
      const tokens = 10_240 + 1024 * Math.floor(rand() * 4);
      const req = AttachSessionRequest.fromPartial({
        sessionId: `big-${Math.floor(rand() * 1e9)}`,
        geometry: { layers: 32, queryHeads: 32, kvHeads: 8, headDim: 128, kvDtype: 1 },
        retrieval: { pageSize: 32, sinkTokens: 32, windowTokens: 64, selectTokens: 256 },
        maxContextTokens: tokens,
        reserveTokens: tokens,
      });
      const attached = new Promise<ServiceError | null>((resolve) => client.attachSession(req, new Metadata(), { deadline: Date.now() + 30_000 }, (e) => resolve(e)));
      // Its segments exist once its memory is being committed.
      const t0 = Date.now();
      while (segmentsOfPid(kv.pid).length === 0 && Date.now() - t0 < 5000) await new Promise((r) => setTimeout(r, 5));
      expect(segmentsOfPid(kv.pid).length).toBeGreaterThan(0);
      kv.child.kill("SIGTERM");
      expect(await exitWithin(kv, 20_000)).toEqual({ code: 0, signal: null });
      await attached;
      expect(segmentsOfPid(kv.pid)).toEqual([]);
    } finally {
      client.close();
      await kv.stop().catch(() => undefined);
      for (const f of segmentsOfPid(kv.pid)) loadAddon().ShmSegment.unlink(`/${f}`);
    }
  }, 60_000);

  it("releases a closed session whose release failed, even when a create of its id was in flight at a retry", async () => {
    const proxy = new RedisProxy();
    await proxy.listen();
    // The compute's calls to the kvstore time out after 4.5 s: a create held that long sees at
    // least two retry rounds of the failed release (every 2 s).
    const tiers: Tiers = await startTiers({
      kvstoreEnv: { ...QUIET, FREEKV_DIRECTORY: proxy.url, FREEKV_DIRECTORY_PREFIX: prefix },
      computeEnv: { ...QUIET, FREEKV_KVSTORE_TIMEOUT_MS: "4500" },
    });
    const compute = computeClient(tiers.compute.address);
    const kv = kvstoreClient(tiers.kvstore.address);
    const listed = async () => (await unary<{ sessionIds: string[] }>(kv, "listSessions", {})).sessionIds;
    let stopped = false;
    try {
      const sid = `closed-${Math.floor(rand() * 1e9)}`;
      const session = { sessionId: sid, kind: ATTENTION, geometry: G, retrieval: R, maxContextTokens: 256 };
      await unary(compute, "createSession", session);
      // The directory goes away: the kvstore cannot forget the session, the close's release fails.
      proxy.down();
      const closed = await unary(compute, "closeSession", { sessionId: sid }).catch((e: ServiceError) => e);
      expect((closed as ServiceError).code).toBe(status.UNAVAILABLE);
      // The kvstore stalls (a pause of its process) while the client creates the id again.
      process.kill(tiers.kvstore.pid, "SIGSTOP");
      stopped = true;
      const again = await unary(compute, "createSession", session, 15_000).catch((e: ServiceError) => e);
      expect([status.DEADLINE_EXCEEDED, status.UNAVAILABLE]).toContain((again as ServiceError).code);
      process.kill(tiers.kvstore.pid, "SIGCONT");
      stopped = false;
      proxy.open();
      // Everything answers again: the session the client closed is released.
      const t0 = Date.now();
      while ((await listed()).includes(sid) && Date.now() - t0 < 15_000) await new Promise((r) => setTimeout(r, 200));
      expect(await listed()).not.toContain(sid);
      const m = await fetchMetrics(tiers.compute.metricsPort);
      expect(metricValue(m, "freekv_compute_releases_pending")).toBe(0);
      // The id is free again.
      await unary(compute, "createSession", session);
      await unary(compute, "closeSession", { sessionId: sid });
    } finally {
      if (stopped) process.kill(tiers.kvstore.pid, "SIGCONT");
      compute.close();
      kv.close();
      proxy.open();
      await tiers.stop().catch(() => undefined);
      await proxy.close();
    }
  }, 60_000);
});
