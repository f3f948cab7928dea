/**
 * Host memory per named session, both tiers as real processes (tools/dev/launch.ts): what the
 * kvstore counts against FREEKV_KVSTORE_CAPACITY_BYTES, what the segments really hold (st_blocks)
 * and their apparent size, for sessions created with a large max_context_tokens that each take a
 * short conversation, with reservations in extents and with the whole context reserved at the
 * first turn (FREEKV_KVSTORE_EXTENT_TOKENS = max_context_tokens: the accounting before extents,
 * which counted every store at its full size). Also the time of one ReserveContext that grows a
 * session by one extent.
 *
 *   npm run build:ts && npm run bench:session-memory [-- --sessions 8 --max-context 32768
 *                                                    --prompt 3 --max-tokens 16 --extent 2048 --out FILE.json]
 *
 * Built-in model on the CPU unless the environment says otherwise. Writes JSON (machine, commit,
 * date, results) to --out, or bench/results/session-memory-<date>.json.
 */
import { mkdirSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { credentials, Metadata, type Client } from "@grpc/grpc-js";
import { ComputeServiceClient, CreateSessionRequest, GenerateRequest, type GenerateResponse } from "../proto/gen/freekv/v1/compute.js";
import { GetStatsRequest, KvStoreServiceClient, ReserveContextRequest, type GetStatsResponse } from "../proto/gen/freekv/v1/kvstore.js";
import { mulberry32 } from "../tools/reference/prng.js";
import { startTiers } from "../tools/dev/launch.js";
import { freekvEnv, gitCommit, machineInfo, resultsPath } from "./common.js";

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, "..", here.includes(`${join("dist", "bench")}`) ? ".." : "");
const { values: args } = parseArgs({
  options: {
    sessions: { type: "string", default: "8" },
    "max-context": { type: "string", default: "32768" },
    prompt: { type: "string", default: "3" },
    "max-tokens": { type: "string", default: "16" },
    extent: { type: "string", default: "2048" },
    out: { type: "string" },
  },
});
const sessions = Number(args.sessions);
const maxContext = Number(args["max-context"]);
const promptLen = Number(args.prompt);
const maxTokens = Number(args["max-tokens"]);
const extent = Number(args.extent);
for (const [k, v] of Object.entries({ sessions, "max-context": maxContext, prompt: promptLen, "max-tokens": maxTokens, extent }))
  if (!Number.isInteger(v) || v < 1) throw new Error(`--${k} must be an integer >= 1`);
const log = (m: string) => process.stderr.write(`${m}\n`);

function unary<Res>(client: Client, method: string, req: unknown): Promise<Res> {
  return new Promise((resolve, reject) => {
    const fn = (client as unknown as Record<string, (...a: unknown[]) => unknown>)[method];
    fn.call(client, req, new Metadata(), { deadline: Date.now() + 60_000 }, (err: Error | null, res: Res) => (err ? reject(err) : resolve(res)));
  });
}

function generate(client: ComputeServiceClient, req: GenerateRequest): Promise<number> {
  return new Promise((resolve, reject) => {
    let n = 0;
    const call = client.generate(req, new Metadata(), { deadline: Date.now() + 300_000 });
    call.on("data", (m: GenerateResponse) => {
      if (m.event?.$case === "chunk") n += m.event.value.tokenIds.length;
    });
    call.on("error", reject);
    call.on("end", () => resolve(n));
  });
}

interface Row {
  mode: string;
  extentTokens: number;
  reservedBytes: number;
  allocatedBytes: number;
  apparentBytes: number;
  perSessionReservedBytes: number;
  reserveOneExtentMs?: number;
}

async function measure(mode: string, extentTokens: number): Promise<Row> {
  const tiers = await startTiers({ kvstoreEnv: { FREEKV_LOG_LEVEL: "warn", FREEKV_KVSTORE_EXTENT_TOKENS: String(extentTokens) }, computeEnv: { FREEKV_LOG_LEVEL: "warn", FREEKV_MAX_CONTEXT_TOKENS: String(maxContext) } });
  const compute = new ComputeServiceClient(tiers.compute.address, credentials.createInsecure());
  const kv = new KvStoreServiceClient(tiers.kvstore.address, credentials.createInsecure());
  try {
    const rand = mulberry32(7);
    const base = await unary<GetStatsResponse>(kv, "getStats", GetStatsRequest.fromPartial({}));
    for (let i = 0; i < sessions; i++) {
      const id = `mem-${i}`;
      await unary(compute, "createSession", CreateSessionRequest.fromPartial({ sessionId: id, maxContextTokens: maxContext }));
      const ids = Array.from({ length: promptLen }, () => 3 + Math.floor(rand() * 500));
      await generate(compute, GenerateRequest.fromPartial({ sessionId: id, prompt: { $case: "tokens", value: { ids } }, maxTokens, sampling: { temperature: 0, topP: 0, topK: 0, seed: 0 } }));
    }
    const s = await unary<GetStatsResponse>(kv, "getStats", GetStatsRequest.fromPartial({}));
    const row: Row = {
      mode,
      extentTokens,
      reservedBytes: Number(s.reservedBytes) - Number(base.reservedBytes),
      allocatedBytes: Number(s.allocatedBytes) - Number(base.allocatedBytes),
      apparentBytes: Number(s.apparentBytes) - Number(base.apparentBytes),
      perSessionReservedBytes: (Number(s.reservedBytes) - Number(base.reservedBytes)) / sessions,
    };
    if (extentTokens < maxContext) {
      // One more extent for the first session, timed at the client (a gRPC call and the fallocate).
      const t0 = performance.now();
      await unary(kv, "reserveContext", ReserveContextRequest.fromPartial({ sessionId: "mem-0", tokens: Math.min(maxContext, 2 * extentTokens) }));
      row.reserveOneExtentMs = Math.round((performance.now() - t0) * 100) / 100;
    }
    return row;
  } finally {
    compute.close();
    kv.close();
    await tiers.stop();
  }
}

const rows = [await measure("extents", extent), await measure("whole context at the first turn", maxContext)];
const mib = (b: number) => `${(b / 2 ** 20).toFixed(2)} MiB`;
const table = [
  `${sessions} named sessions, max_context_tokens ${maxContext}, one turn each (${promptLen}-token prompt, ${maxTokens} new tokens)`,
  "mode                              | counted (reserved) | allocated (st_blocks) | apparent     | per session   | +1 extent",
  ...rows.map((r) => `${r.mode.padEnd(33)} | ${mib(r.reservedBytes).padStart(18)} | ${mib(r.allocatedBytes).padStart(21)} | ${mib(r.apparentBytes).padStart(12)} | ${mib(r.perSessionReservedBytes).padStart(13)} | ${r.reserveOneExtentMs === undefined ? "" : `${r.reserveOneExtentMs} ms`}`),
];
console.log(table.join("\n"));

const commit = gitCommit(root);
const doc = {
  what: "host memory of named sessions with a large max context: counted, allocated and apparent bytes, with reservations in extents and with the whole context reserved",
  date: new Date().toISOString(),
  commit,
  machine: machineInfo(),
  env: freekvEnv(),
  params: { sessions, maxContext, promptLen, maxTokens, extent },
  results: rows,
};
const out = args.out ?? resultsPath(root, "session-memory");
mkdirSync(dirname(out), { recursive: true });
writeFileSync(out, JSON.stringify(doc, null, 2));
log(`wrote ${out}`);
