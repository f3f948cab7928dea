/**
 * The kvstore SIGKILLed in the middle of a Generate, with the in-memory directory: the restarted
 * kvstore knows no session, so compute marks the session lost (DATA_LOSS on its next call, counted
 * and logged) instead of answering over pages that are gone, and frees the session's engine session
 * and mappings at once (before any CloseSession); and the restarted kvstore removes the
 * dead process's segments from /dev/shm at start, leaving a live process's alone.
 */
import { existsSync, readFileSync, readdirSync } from "node:fs";
import { afterAll, describe, expect, it } from "vitest";
import { Metadata, status, type ServiceError } from "@grpc/grpc-js";
import { GenerateRequest, type ComputeServiceClient, type GenerateResponse } from "../../proto/gen/freekv/v1/compute.js";
import { loadAddon } from "../../native/binding.js";
import { healthCheck } from "../helpers/grpc-probes.js";
import { prng } from "../helpers/prng.js";
import { QUIET, computeClient, fetchMetrics, kvstoreClient, metricValue, startService, startTiers, unary, unaryError, type ServiceProcess, type Tiers } from "../helpers/services.js";

const R = { pageSize: 16, sinkTokens: 32, windowTokens: 64, selectTokens: 256 };
const VOCAB = 512; // the built-in model's
const addon = loadAddon();
const cleanup: (() => Promise<unknown> | unknown)[] = [];
afterAll(async () => {
  for (const f of cleanup.reverse()) await f();
});

function generate(client: ComputeServiceClient, req: Partial<GenerateRequest>, onChunk?: (n: number) => void): Promise<{ tokens: number[]; error?: ServiceError }> {
  return new Promise((resolve) => {
    const tokens: number[] = [];
    const call = client.generate(GenerateRequest.fromPartial(req), new Metadata(), { deadline: Date.now() + 60_000 });
    call.on("data", (m: GenerateResponse) => {
      if (m.event?.$case !== "chunk") return;
      tokens.push(...m.event.value.tokenIds);
      onChunk?.(tokens.length);
    });
    call.on("error", (e: ServiceError) => resolve({ tokens, error: e }));
    call.on("end", () => resolve({ tokens }));
  });
}

async function waitFor(what: string, ok: () => Promise<boolean>, ms = 20_000): Promise<void> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await ok().catch(() => false)) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out waiting for ${what}`);
}

function startTime(pid: number): string {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  return stat.slice(stat.lastIndexOf(")") + 2).split(" ")[19];
}

describe("kvstore restart with the in-memory directory", () => {
  it("SIGKILL mid-Generate: the session is reported lost (DATA_LOSS), and the dead kvstore's segments are removed at the next start", async () => {
    const tiers: Tiers = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...QUIET, FREEKV_THREADS: "2", FREEKV_KVSTORE_TIMEOUT_MS: "1000" } });
    cleanup.push(() => tiers.stop());
    const client = computeClient(tiers.compute.address);
    const rand = prng(0x5eed07);
    const tokens = (n: number) => Array.from({ length: n }, () => 3 + Math.floor(rand() * (VOCAB - 3)));
    const { session } = await unary<{ session: { sessionId: string } }>(client, "createSession", { sessionId: "lost-1", retrieval: R, maxContextTokens: 1024 });
    const kv = kvstoreClient(tiers.kvstore.address);
    const att = await unary<Record<string, { name: string }>>(kv, "attachSession", { sessionId: session.sessionId });
    kv.close();
    const names = [att.store.name, att.staging.name, att.tail.name, att.manifest.name];
    for (const n of names) expect(existsSync(`/dev/shm${n}`)).toBe(true);
    // A live process's segment (this test's pid) must survive the sweep; a dead pid's must not.
    const running = new Set(readdirSync("/proc").filter((d) => /^\d+$/.test(d)).map(Number));
    let dead = 400000 + (process.pid % 1000);
    while (running.has(dead)) dead++;
    const hex = () => Math.floor(Math.random() * 2 ** 48).toString(16).padStart(32, "0");
    const liveName = `/freekv-kv-${process.pid}-${startTime(process.pid)}-m-${hex()}`;
    const deadName = `/freekv-kv-${dead}-12345-m-${hex()}`;
    // A dead kvstore's segment with a persistent directory is its successor's to adopt: kept.
    const deadPersistent = `/freekv-kv-${dead}-12345-p-${hex()}`;
    for (const n of [liveName, deadName, deadPersistent]) {
      addon.ShmSegment.create(n, 4096).close();
      cleanup.push(() => addon.ShmSegment.unlink(n));
    }

    // Compute maps the session's segments while it serves it.
    const mapped = () => {
      const maps = readFileSync(`/proc/${tiers.compute.pid}/maps`, "utf8");
      return names.filter((n) => maps.includes(`/dev/shm${n}`));
    };
    expect(mapped()).toEqual(names);
    const t1 = await generate(client, { sessionId: session.sessionId, prompt: { $case: "tokens", value: { ids: tokens(40) } }, maxTokens: 200, ignoreEos: true }, (n) => {
      if (n === 4) tiers.kvstore.child.kill("SIGKILL");
    });
    expect(t1.tokens.length).toBeGreaterThanOrEqual(4);
    await tiers.kvstore.exited;

    const kvstore: ServiceProcess = await startService("kvstore", {
      env: { ...QUIET, FREEKV_KVSTORE_PORT: String(tiers.kvstore.grpcPort), FREEKV_KVSTORE_METRICS_PORT: "0" },
    });
    cleanup.push(() => kvstore.stop());
    // The dead kvstore's segments are gone; a live process's are kept.
    for (const n of [...names, deadName]) expect(existsSync(`/dev/shm${n}`), n).toBe(false);
    expect(existsSync(`/dev/shm${liveName}`)).toBe(true);
    expect(existsSync(`/dev/shm${deadPersistent}`)).toBe(true);

    // Compute notices once the kvstore serves again: the session is lost, counted.
    await waitFor("the session marked lost", async () => (metricValue(await fetchMetrics(tiers.compute.metricsPort), "freekv_compute_sessions_lost_total") ?? 0) >= 1);
    // What it held is freed at once, before any CloseSession: no mapping of its segments is left
    // (their memory goes back to the system), the degraded gauge counts it.
    await waitFor("compute to unmap the lost session's segments", async () => mapped().length === 0);
    expect(tiers.compute.output.join("\n")).toMatch(/its engine session and mappings are freed now/);
    expect(metricValue(await fetchMetrics(tiers.compute.metricsPort), "freekv_compute_degraded_sessions")).toBe(1);
    const t2 = await generate(client, { sessionId: session.sessionId, prompt: { $case: "tokens", value: { ids: tokens(5) } }, maxTokens: 8 });
    expect(t2.error?.code).toBe(status.DATA_LOSS);
    expect(t2.error?.details).toMatch(/session "lost-1" is lost: the kvstore no longer holds it/);
    expect(t2.tokens).toEqual([]);
    expect(tiers.compute.output.join("\n")).toMatch(/session lost: the kvstore no longer holds it/);

    // Closing it frees compute's side; it is then unknown. Compute still serves new sessions.
    await unary(client, "closeSession", { sessionId: session.sessionId });
    expect((await unaryError(client, "getSession", { sessionId: session.sessionId })).code).toBe(status.NOT_FOUND);
    await waitFor("compute SERVING", async () => (await healthCheck(tiers.compute.address)) === "SERVING");
    const fresh = await generate(client, { prompt: { $case: "tokens", value: { ids: tokens(8) } }, maxTokens: 4 });
    expect(fresh.error).toBeUndefined();
    client.close();
  }, 120_000);
});
