/**
 * Tensor exchanges are bounded: streams opening exchanges past FREEKV_EXCHANGE_CAPACITY_BYTES get
 * RESOURCE_EXHAUSTED naming the setting, compute stays up and serves, the bytes in use are a
 * metric, and a stream that ends gives its share back. ExchangeBudget also refuses an exchange
 * larger than /dev/shm's free space (a tmpfs segment past it would SIGBUS when written).
 */
import { status } from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { ComputeServiceClient } from "../../proto/gen/freekv/v1/compute.js";
import { ExchangeBudget } from "../../services/compute/attention/exchange.js";
import { AttentionStream } from "../helpers/attention-stream.js";
import { healthCheck } from "../helpers/grpc-probes.js";
import { QUIET, computeClient, fetchMetrics, metricValue, shmSegments, startTiers, type Tiers } from "../helpers/services.js";

const EACH = 256 << 10;
const CAP = 4 * EACH;
let tiers: Tiers;
let compute: ComputeServiceClient;

beforeAll(async () => {
  tiers = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...QUIET, FREEKV_MODEL: "none", FREEKV_EXCHANGE_CAPACITY_BYTES: String(CAP) } });
  compute = computeClient(tiers.compute.address);
}, 60_000);

afterAll(async () => {
  compute?.close();
  await tiers?.stop();
});

async function openExchange(s: AttentionStream, sizeBytes: number): Promise<string> {
  const r = await s.send({ op: { $case: "openExchange", value: { sizeBytes } } });
  if (r.result?.$case !== "exchange") throw new Error("expected an exchange result");
  return r.result.value.segmentName;
}

const inUse = async () => metricValue(await fetchMetrics(tiers.compute.metricsPort), "freekv_compute_exchange_bytes");

describe("tensor exchange capacity", () => {
  it("exchanges past the cap are RESOURCE_EXHAUSTED; compute stays up; a closed stream frees its share", async () => {
    const streams: AttentionStream[] = [];
    const names: string[] = [];
    for (let i = 0; i < 4; i++) {
      const s = new AttentionStream(compute);
      streams.push(s);
      names.push(await openExchange(s, EACH));
    }
    expect(await inUse()).toBe(CAP);
    expect(metricValue(await fetchMetrics(tiers.compute.metricsPort), "freekv_compute_exchange_capacity_bytes")).toBe(CAP);

    const over = new AttentionStream(compute);
    const e = await openExchange(over, 4096).catch((x: { code: number; details: string }) => x);
    expect(e).toMatchObject({ code: status.RESOURCE_EXHAUSTED });
    expect((e as { details: string }).details).toMatch(/FREEKV_EXCHANGE_CAPACITY_BYTES=1048576/);
    await over.ended;

    // Compute is alive and serving; the refused exchange left nothing behind.
    expect(tiers.compute.child.exitCode).toBeNull();
    expect(await healthCheck(tiers.compute.address)).toBe("SERVING");
    expect(await inUse()).toBe(CAP);
    for (const n of names) expect(shmSegments().has(n)).toBe(true);

    // Ending one stream gives its share back: the next exchange fits.
    await streams[0].close();
    expect(shmSegments().has(names[0])).toBe(false);
    expect(await inUse()).toBe(CAP - EACH);
    const again = new AttentionStream(compute);
    streams.push(again);
    await openExchange(again, EACH);
    expect(await inUse()).toBe(CAP);

    for (const s of streams.slice(1)) s.cancel();
    await Promise.all(streams.slice(1).map((s) => s.ended));
    await expect.poll(inUse, { timeout: 5000 }).toBe(0);
  });
});

describe("ExchangeBudget", () => {
  it("refuses more than /dev/shm has free, and counts releases", () => {
    let free = 10_000;
    const b = new ExchangeBudget(1 << 20, () => free);
    expect(() => b.reserve(20_000)).toThrow(/more than \/dev\/shm has free \(10000 bytes\)/);
    expect(b.bytesInUse).toBe(0);
    b.reserve(8192);
    expect(b.bytesInUse).toBe(8192);
    free = 1 << 30;
    expect(() => b.reserve(1 << 20)).toThrow(/over FREEKV_EXCHANGE_CAPACITY_BYTES=1048576 \(1 open, 8192 bytes\)/);
    b.release(8192);
    expect(b.bytesInUse).toBe(0);
    expect(b.open).toBe(0);
  });
});
