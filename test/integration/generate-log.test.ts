/**
 * The request log: every finished Generate (completed or failed) writes one info line with its
 * session, tenant, token counts, time to first token, time per output token, finish reason and
 * status; levels are strings; no info line names shared-memory segments. Both tiers as processes
 * at FREEKV_LOG_LEVEL=info, the built-in model, random prompts.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Metadata, status, type ServiceError } from "@grpc/grpc-js";
import { GenerateRequest, type GenerateFinal, type GenerateResponse } from "../../proto/gen/freekv/v1/compute.js";
import { computeClient, startTiers, unary, type Tiers } from "../helpers/services.js";
import { prng } from "../helpers/prng.js";

const seed = Number(process.env.FREEKV_TEST_SEED) || (Date.now() ^ (process.pid << 6)) >>> 0;
const rand = prng(seed);
let tiers: Tiers;
let client: ReturnType<typeof computeClient>;

beforeAll(async () => {
  const env = { FREEKV_LOG_LEVEL: "info", FREEKV_SHUTDOWN_GRACE_MS: "3000" };
  tiers = await startTiers({ kvstoreEnv: env, computeEnv: { ...env, FREEKV_THREADS: "2" } });
  client = computeClient(tiers.compute.address);
});

afterAll(async () => {
  client?.close();
  await tiers?.stop();
});

function run(req: Partial<GenerateRequest>, tenant?: string): Promise<GenerateFinal | undefined> {
  const md = new Metadata();
  if (tenant) md.set("x-freekv-tenant", tenant);
  const stream = client.generate(GenerateRequest.fromPartial(req), md, { deadline: Date.now() + 60_000 });
  let final: GenerateFinal | undefined;
  return new Promise((resolve, reject) => {
    stream.on("data", (m: GenerateResponse) => {
      if (m.event?.$case === "final") final = m.event.value;
    });
    stream.on("error", reject);
    stream.on("end", () => resolve(final));
  });
}

type Line = Record<string, unknown> & { level: unknown; msg: string };
const lines = (out: string[]): Line[] =>
  out.flatMap((l) => {
    try {
      const o = JSON.parse(l) as Line;
      return typeof o.msg === "string" ? [o] : []; // log lines, not the ready line
    } catch {
      return [];
    }
  });

async function requestLines(n: number): Promise<Line[]> {
  const t0 = Date.now();
  for (;;) {
    const found = lines(tiers.compute.output).filter((l) => l.msg === "generate finished");
    if (found.length >= n || Date.now() - t0 > 5000) return found;
    await new Promise((r) => setTimeout(r, 25));
  }
}

describe(`the request log (seed ${seed})`, () => {
  it("one info line per finished request, string levels, no segment names at info", async () => {
    const tenant = `team-${Math.floor(rand() * 1e6)}`;
    const maxTokens = 3 + Math.floor(rand() * 10);
    const ids = Array.from({ length: 4 + Math.floor(rand() * 20) }, () => Math.floor(rand() * 500));
    const ok = await run({ prompt: { $case: "tokens", value: { ids } }, maxTokens, sampling: { temperature: 0.8, topP: 0.9, topK: 0, seed: Math.floor(rand() * 1000) } }, tenant);
    await unary(client, "createSession", { sessionId: `log-${seed}`, kind: 1 });
    await run({ sessionId: `log-${seed}`, prompt: { $case: "text", value: "Hello there" }, maxTokens: 2 });
    await unary(client, "closeSession", { sessionId: `log-${seed}` });
    const bad = await run({ prompt: { $case: "tokens", value: { ids } }, maxTokens: 0 }).then(
      () => undefined,
      (e: ServiceError) => e,
    );
    expect(bad?.code).toBe(status.INVALID_ARGUMENT);

    const found = await requestLines(3);
    expect(found).toHaveLength(3);
    const [first, second, third] = found;
    expect(first).toMatchObject({ level: "info", tenant, promptTokens: ids.length, completionTokens: ok?.usage?.completionTokens, finish: expect.any(String), status: "OK" });
    expect(first.session).toEqual(expect.any(String));
    expect(first.ttftMs).toBeGreaterThan(0);
    if ((ok?.usage?.completionTokens ?? 0) > 1) expect(first.tpotMs).toBeGreaterThan(0);
    expect(second).toMatchObject({ level: "info", session: `log-${seed}`, completionTokens: 2, finish: "length", status: "OK" });
    expect(second.tenant).toBeUndefined();
    expect(third).toMatchObject({ level: "info", status: "INVALID_ARGUMENT" });

    for (const [name, out] of [["compute", tiers.compute.output], ["kvstore", tiers.kvstore.output]] as const) {
      const all = lines(out);
      expect(all.length, name).toBeGreaterThan(0);
      for (const l of all) expect(typeof l.level, `${name}: ${JSON.stringify(l)}`).toBe("string");
      for (const l of all.filter((x) => x.level === "info")) {
        expect(l.segments, `${name}: ${JSON.stringify(l)}`).toBeUndefined();
        expect(JSON.stringify(l), name).not.toMatch(/\/freekv-/);
      }
    }
    // A named session's close says where its time went (engine, unmapping, the kvstore's release).
    const closed = lines(tiers.compute.output).filter((l) => l.msg === "session closed" && l.session === `log-${seed}`);
    expect(closed).toHaveLength(1);
    for (const k of ["closeMs", "engineCloseMs", "unmapMs", "releaseMs"]) expect(closed[0][k], k).toEqual(expect.any(Number));
    expect(Number(closed[0].closeMs)).toBeGreaterThanOrEqual(Number(closed[0].releaseMs));
    // The request's own session leaves no info line of its own on compute: the request line says it.
    const unnamed = String(first.session);
    expect(lines(tiers.compute.output).filter((l) => l.level === "info" && l.session === unnamed)).toHaveLength(1);
  });
});
