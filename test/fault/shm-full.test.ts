/**
 * /dev/shm full under the kvstore's own segments, with real processes in a private mount
 * namespace whose /dev/shm is a 48 MiB tmpfs (skipped where `unshare -m` is not permitted), and a
 * kvstore told it may use far more (FREEKV_KVSTORE_CAPACITY_BYTES 1 GiB, an operator's mistake):
 * a session whose memory does not fit is refused with RESOURCE_EXHAUSTED naming /dev/shm (the
 * kvstore commits memory with fallocate, so a full tmpfs is an error code, not a later SIGBUS),
 * counted; both processes keep serving, a session made before keeps generating exactly as a fresh
 * run, and what the refused session had taken is given back (a smaller session fits afterwards).
 * A tensor exchange is committed when it is opened, so /dev/shm filling up afterwards cannot turn
 * compute's write of an output into SIGBUS.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { closeSync, openSync, rmSync, writeSync } from "node:fs";
import { afterAll, describe, expect, it } from "vitest";
import { Metadata, status, type ServiceError } from "@grpc/grpc-js";
import { GenerateRequest, type ComputeServiceClient, type GenerateResponse } from "../../proto/gen/freekv/v1/compute.js";
import { healthCheck } from "../helpers/grpc-probes.js";
import { AttentionStream, f32Tensor } from "../helpers/attention-stream.js";
import { prng, randomF32 } from "../helpers/prng.js";
import { ATTENTION, QUIET, computeClient, fetchMetrics, kvstoreClient, metricValue, startTiers, unary, type Tiers } from "../helpers/services.js";

const canUnshare = spawnSync("unshare", ["-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"], { stdio: "ignore" }).status === 0;
const cleanup: (() => Promise<unknown> | unknown)[] = [];
afterAll(async () => {
  for (const f of cleanup.reverse()) await f();
});
const seed = Number(process.env.FREEKV_TEST_SEED ?? Date.now() % 1e9);
const rand = prng(seed);
const R = { pageSize: 16, sinkTokens: 16, windowTokens: 32, selectTokens: 64 };
// 16 KiB of K/V per token: 48 MiB of tmpfs holds ~3000 tokens of it.
const G = { layers: 4, queryHeads: 8, kvHeads: 8, headDim: 128, kvDtype: 1 };

function generate(client: ComputeServiceClient, req: Partial<GenerateRequest>): Promise<{ tokens: number[]; error?: ServiceError }> {
  return new Promise((resolve) => {
    const tokens: number[] = [];
    const call = client.generate(GenerateRequest.fromPartial(req), new Metadata(), { deadline: Date.now() + 60_000 });
    call.on("data", (m: GenerateResponse) => {
      if (m.event?.$case === "chunk") tokens.push(...m.event.value.tokenIds);
    });
    call.on("error", (error: ServiceError) => resolve({ tokens, error }));
    call.on("end", () => resolve({ tokens }));
  });
}

/** A process holding a new mount namespace with a small tmpfs on /dev/shm; its pid for nsenter. */
async function namespaceWithSmallShm(mib: number): Promise<ChildProcess> {
  const holder = spawn("unshare", ["-m", "--propagation", "private", "sh", "-c", `mount -t tmpfs -o size=${mib}m tmpfs /dev/shm && echo ready && exec sleep 3600`], { stdio: ["ignore", "pipe", "inherit"] });
  await new Promise<void>((resolve, reject) => {
    holder.stdout!.once("data", () => resolve());
    holder.once("exit", (code) => reject(new Error(`unshare exited ${code}`)));
  });
  return holder;
}

if (!canUnshare) console.log("shm-full: skipped: unshare -m (a private mount namespace) is not permitted on this machine");

describe.skipIf(!canUnshare)("/dev/shm full under the kvstore", () => {
  it("refuses what does not fit with RESOURCE_EXHAUSTED, keeps serving and gives the space back", async () => {
    const holder = await namespaceWithSmallShm(48);
    cleanup.push(() => holder.kill("SIGKILL"));
    const wrap = ["nsenter", "-t", String(holder.pid), "-m", `--wd=${process.cwd()}`, "--"];
    const tiers: Tiers = await startTiers({ wrap, kvstoreEnv: { ...QUIET, FREEKV_KVSTORE_CAPACITY_BYTES: String(1 << 30) }, computeEnv: { ...QUIET, FREEKV_THREADS: "2" } });
    cleanup.push(() => tiers.stop());
    const client = computeClient(tiers.compute.address);

    // A model session made before: one turn.
    const { session } = await unary<{ session: { sessionId: string } }>(client, "createSession", { retrieval: R, maxContextTokens: 512 });
    const p1 = Array.from({ length: 60 }, () => 3 + Math.floor(rand() * 500));
    const t1 = await generate(client, { sessionId: session.sessionId, prompt: { $case: "tokens", value: { ids: p1 } }, maxTokens: 10 });
    expect(t1.error).toBeUndefined();

    // 8192 tokens of attention K/V (128 MiB) cannot be placed in 48 MiB.
    const big = await unary(client, "createSession", { sessionId: "too-big", kind: ATTENTION, geometry: G, retrieval: R, maxContextTokens: 8192 }).catch((e: ServiceError) => e);
    expect((big as ServiceError).code).toBe(status.RESOURCE_EXHAUSTED);
    expect((big as ServiceError).details).toMatch(/shm|shared memory|ENOSPC|no space/i);
    expect(metricValue(await fetchMetrics(tiers.kvstore.metricsPort), "freekv_kvstore_rejected_total", 'reason="shm"')).toBeGreaterThanOrEqual(1);

    // Both serving; the earlier session continues exactly like a fresh run over what it holds.
    expect(tiers.compute.child.exitCode).toBeNull();
    expect(tiers.kvstore.child.exitCode).toBeNull();
    expect(await healthCheck(tiers.compute.address)).toBe("SERVING");
    expect(await healthCheck(tiers.kvstore.address)).toBe("SERVING");
    const p2 = Array.from({ length: 7 }, () => 3 + Math.floor(rand() * 500));
    const t2 = await generate(client, { sessionId: session.sessionId, prompt: { $case: "tokens", value: { ids: p2 } }, maxTokens: 8 });
    expect(t2.error).toBeUndefined();
    const ref = await generate(client, { prompt: { $case: "tokens", value: { ids: [...p1, ...t1.tokens, ...p2] } }, maxTokens: 8, retrieval: R as never });
    expect(t2.tokens).toEqual(ref.tokens);

    // The refused session's partial allocation was given back: 1024 tokens (16 MiB) fit.
    await unary(client, "createSession", { sessionId: "fits", kind: ATTENTION, geometry: G, retrieval: R, maxContextTokens: 1024 });
    await unary(client, "closeSession", { sessionId: "fits" });
    client.close();
  }, 120_000);

  it("a reservation that does not fit, committed by threads, gives back every page it had filled", async () => {
    // FREEKV_KVSTORE_COMMIT_THREADS commits memory by write faults in 64 MiB pieces: the piece that
    // meets the full tmpfs is filled part-way when it fails, and must go with the rest.
    const holder = await namespaceWithSmallShm(48);
    cleanup.push(() => holder.kill("SIGKILL"));
    const wrap = ["nsenter", "-t", String(holder.pid), "-m", `--wd=${process.cwd()}`, "--"];
    const used = () => {
      const r = spawnSync("nsenter", ["-t", String(holder.pid), "-m", "--", "df", "-B1", "--output=used", "/dev/shm"], { encoding: "utf8" });
      expect(r.status, r.stderr).toBe(0);
      return Number(r.stdout.trim().split("\n").at(-1));
    };
    const threads = 1 + Math.floor(rand() * 3);
    const tiers: Tiers = await startTiers({ wrap, kvstoreEnv: { ...QUIET, FREEKV_KVSTORE_CAPACITY_BYTES: String(1 << 30), FREEKV_KVSTORE_COMMIT_THREADS: String(threads), FREEKV_KVSTORE_EXTENT_TOKENS: "256" } });
    cleanup.push(() => tiers.stop());
    const kv = kvstoreClient(tiers.kvstore.address);
    await unary(kv, "attachSession", { sessionId: "grows", geometry: G, retrieval: R, maxContextTokens: 8192, reserveTokens: 256 });
    const before = used();
    // 8192 tokens of K/V (128 MiB) cannot be committed in 48 MiB.
    const e = await unary(kv, "reserveContext", { sessionId: "grows", tokens: 8192 }).catch((x: ServiceError) => x);
    expect((e as ServiceError).code, `threads ${threads}, seed ${seed}`).toBe(status.RESOURCE_EXHAUSTED);
    expect(used(), `threads ${threads}, seed ${seed}: /dev/shm bytes in use after the refused reservation`).toBe(before);
    // And the space is there again: a reservation that fits in what is free succeeds.
    await unary(kv, "reserveContext", { sessionId: "grows", tokens: 1024 });
    kv.close();
  }, 120_000);

  it("commits a tensor exchange when it is opened: /dev/shm filling up afterwards cannot kill compute", async () => {
    const holder = await namespaceWithSmallShm(32);
    cleanup.push(() => holder.kill("SIGKILL"));
    const wrap = ["nsenter", "-t", String(holder.pid), "-m", `--wd=${process.cwd()}`, "--"];
    const tiers: Tiers = await startTiers({ wrap, kvstoreEnv: { ...QUIET, FREEKV_KVSTORE_CAPACITY_BYTES: String(1 << 30) }, computeEnv: { ...QUIET, FREEKV_THREADS: "2" } });
    cleanup.push(() => tiers.stop());
    const client = computeClient(tiers.compute.address);
    const g = { layers: 2, queryHeads: 4, kvHeads: 2, headDim: 32, kvDtype: 1 };
    await unary(client, "createSession", { sessionId: "xch", kind: ATTENTION, geometry: g, retrieval: R, maxContextTokens: 64 });
    const s = new AttentionStream(client);
    const kv = (n: number) => f32Tensor(randomF32(n * g.kvHeads * g.headDim, rand), n === 1 ? [g.kvHeads, g.headDim] : [n, g.kvHeads, g.headDim]);
    for (let l = 0; l < g.layers; l++) await s.send({ op: { $case: "prefill", value: { sessionId: "xch", layer: l, k: kv(20), v: kv(20) } } });
    const size = 4 << 20;
    const opened = await s.send({ op: { $case: "openExchange", value: { sizeBytes: size } } });
    if (opened.result?.$case !== "exchange") throw new Error("expected an exchange");
    // The segment as the namespace sees it: the client's q goes in its first page.
    const root = `/proc/${holder.pid}/root/dev/shm`;
    const fd = openSync(`${root}${opened.result.value.segmentName}`, "r+");
    const q = randomF32(g.queryHeads * g.headDim, rand);
    writeSync(fd, new Uint8Array(q.buffer), 0, q.byteLength, 0);
    closeSync(fd);
    // Anything else on the node takes the rest of /dev/shm.
    const filler = openSync(`${root}/filler`, "w");
    const block = Buffer.alloc(1 << 16, 7);
    let full = false;
    try {
      for (;;) writeSync(filler, block);
    } catch (e) {
      full = (e as { code?: string }).code === "ENOSPC";
    } finally {
      closeSync(filler);
    }
    expect(full).toBe(true);
    // An output written near the end of the exchange, into pages nobody has touched.
    const r = await s.send({ op: { $case: "decode", value: { layer: 0, items: [{ sessionId: "xch", qRef: { offset: 0, dtype: 1, shape: [g.queryHeads, g.headDim] }, k: kv(1), v: kv(1), outputOffset: size - (64 << 10) }] } } });
    expect(r.result?.$case === "decode" && r.result.value.outputOffsets).toEqual([size - (64 << 10)]);
    expect(tiers.compute.child.exitCode).toBeNull();
    expect(tiers.compute.child.signalCode).toBeNull();
    // Another exchange does not fit now: refused, not a crash.
    const s2 = new AttentionStream(client);
    const e = await s2.send({ op: { $case: "openExchange", value: { sizeBytes: 1 << 20 } } }).catch((x: ServiceError) => x);
    expect((e as ServiceError).code).toBe(status.RESOURCE_EXHAUSTED);
    rmSync(`${root}/filler`);
    expect(await healthCheck(tiers.compute.address)).toBe("SERVING");
    client.close();
  }, 120_000);
});
