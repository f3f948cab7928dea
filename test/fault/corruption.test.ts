/**
 * A corrupted byte in a stored page, with real processes: a named session generates (its pages
 * are committed and checksummed), a bit of one committed page is flipped in shared memory from
 * outside both services, the kvstore's scrubber finds it, and the session's next turn gets
 * DATA_LOSS (never tokens generated over the bad page); the corruption is counted and logged on
 * both tiers; a second session, untouched, keeps generating exactly like a fresh run; the corrupt
 * session is released like any other.
 */
import { afterAll, describe, expect, it } from "vitest";
import { Metadata, status, type ServiceError } from "@grpc/grpc-js";
import { FinishReason, GenerateRequest, type ComputeServiceClient, type GenerateResponse } from "../../proto/gen/freekv/v1/compute.js";
import { loadShm } from "../../native/shm.js";
import { prng } from "../helpers/prng.js";
import { QUIET, computeClient, fetchMetrics, kvstoreClient, metricValue, shmSegments, startTiers, unary, type Tiers } from "../helpers/services.js";

const R = { pageSize: 16, sinkTokens: 16, windowTokens: 32, selectTokens: 64 };
const VOCAB = 512;
const cleanup: (() => Promise<unknown> | unknown)[] = [];
afterAll(async () => {
  for (const f of cleanup.reverse()) await f();
});
const seed = Number(process.env.FREEKV_TEST_SEED ?? Date.now() % 1e9);
const rand = prng(seed);
const why = `seed ${seed} (FREEKV_TEST_SEED)`;

interface Run {
  tokens: number[];
  finishReason?: FinishReason;
  error?: ServiceError;
}
function generate(client: ComputeServiceClient, req: Partial<GenerateRequest>): Promise<Run> {
  return new Promise((resolve) => {
    const out: Run = { tokens: [] };
    const call = client.generate(GenerateRequest.fromPartial(req), new Metadata(), { deadline: Date.now() + 60_000 });
    call.on("data", (m: GenerateResponse) => {
      if (m.event?.$case === "chunk") out.tokens.push(...m.event.value.tokenIds);
      if (m.event?.$case === "final") out.finishReason = m.event.value.finishReason;
    });
    call.on("error", (e: ServiceError) => resolve({ ...out, error: e }));
    call.on("end", () => resolve(out));
  });
}
const randomTokens = (n: number) => Array.from({ length: n }, () => 3 + Math.floor(rand() * (VOCAB - 3)));

async function waitFor(what: string | (() => string), ok: () => Promise<boolean>, ms = 20_000): Promise<void> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await ok().catch(() => false)) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out waiting for ${typeof what === "string" ? what : what()}`);
}

describe("a corrupted stored page", () => {
  it("is found by the scrubber and the session's next turn gets DATA_LOSS; other sessions are untouched", async () => {
    const tiers: Tiers = await startTiers({ kvstoreEnv: { ...QUIET, FREEKV_SCRUB_BYTES_PER_S: String(64 << 20) }, computeEnv: { ...QUIET, FREEKV_THREADS: "2" } });
    cleanup.push(() => tiers.stop());
    const client = computeClient(tiers.compute.address);
    const kv = kvstoreClient(tiers.kvstore.address);
    const ids: string[] = [];
    for (let i = 0; i < 2; i++) {
      const { session } = await unary<{ session: { sessionId: string } }>(client, "createSession", { retrieval: R, maxContextTokens: 512 });
      ids.push(session.sessionId);
      // The prompt alone fills the 8 pages waited for below: the generation may stop early at
      // the model's EOS (with 120 prompt tokens, a seed whose completion ended within 7 tokens
      // left 7 full pages and the wait ran out).
      const t = await generate(client, { sessionId: session.sessionId, prompt: { $case: "tokens", value: { ids: randomTokens(136) } }, maxTokens: 24 });
      expect(t.error, why).toBeUndefined();
      expect(t.tokens.length, why).toBeGreaterThanOrEqual(1);
    }
    const [bad, good] = ids;
    // Wait until the kvstore holds the committed pages, then flip one bit of one of them.
    let committed: number[] = [];
    // Up to a minute: on a loaded 2-core machine a commit that failed is retried with a backoff of up to 5 s.
    await waitFor(() => `8 committed pages a layer (last seen ${JSON.stringify(committed)}; ${why})`, async () => {
      committed = (await unary<{ committedPages: number[] }>(kv, "attachSession", { sessionId: bad })).committedPages;
      return committed.every((c) => c >= 8);
    }, 60_000);
    const a = await unary<{ store: { name: string }; layout: { pageBytes: string | number; layerStrideBytes: string | number } }>(kv, "attachSession", { sessionId: bad });
    const seg = loadShm().ShmSegment.open(a.store.name);
    const layer = Math.floor(rand() * committed.length), page = Math.floor(rand() * 8);
    const bytes = new Uint8Array(seg.buffer());
    bytes[layer * Number(a.layout.layerStrideBytes) + page * Number(a.layout.pageBytes) + Math.floor(rand() * Number(a.layout.pageBytes))] ^= 1 << Math.floor(rand() * 8);
    seg.close();
    await waitFor("the scrubber's finding", async () => (metricValue(await fetchMetrics(tiers.kvstore.metricsPort), "freekv_kvstore_corrupt_pages_total") ?? 0) >= 1);

    const t = await generate(client, { sessionId: bad, prompt: { $case: "tokens", value: { ids: randomTokens(5) } }, maxTokens: 8 });
    expect(t.error?.code, why).toBe(status.DATA_LOSS);
    expect(t.tokens).toHaveLength(0);
    expect(t.error?.details).toMatch(/a committed page changed after its commit/);
    expect(tiers.kvstore.output.join("\n")).toMatch(new RegExp(`scrubber: a committed page no longer matches its checksum`));
    expect(tiers.compute.output.join("\n")).toMatch(/session lost: a committed page changed after its commit/);
    expect(metricValue(await fetchMetrics(tiers.compute.metricsPort), "freekv_compute_sessions_lost_total")).toBe(1);

    // The other session generates exactly like a fresh run over what it holds.
    const t2 = await generate(client, { sessionId: good, prompt: { $case: "tokens", value: { ids: randomTokens(7) } }, maxTokens: 8 });
    expect(t2.error, why).toBeUndefined();
    // All 8 tokens, or fewer where the model produced its EOS (random prompts: some seeds do).
    if (t2.finishReason === FinishReason.FINISH_REASON_STOP_TOKEN) expect(t2.tokens.length, why).toBeLessThanOrEqual(8);
    else {
      expect(t2.finishReason, why).toBe(FinishReason.FINISH_REASON_LENGTH);
      expect(t2.tokens, why).toHaveLength(8);
    }

    // Closed like any other session: its segments go.
    const names = shmSegments();
    expect(names.has(a.store.name)).toBe(true);
    await unary(client, "closeSession", { sessionId: bad });
    await waitFor("the corrupt session's segments removed", async () => !shmSegments().has(a.store.name));
    kv.close();
    client.close();
  }, 120_000);
});
