/**
 * How long moving a session between two pods takes, and at what rate its bytes travel.
 *
 * Two compute + kvstore pairs run as real processes on this machine (tools/dev/launch.ts). For
 * each context size, a session of the served model (the built-in one unless FREEKV_MODEL says
 * otherwise) is prefilled to that many tokens on pod A and moved to pod B and back, once per
 * chunk size; each move is timed at the client (MoveSession's round trip: the session's lock and
 * commits on the source, the export, the two hops through both computes, the import's checks and
 * writes, the re-attach on the target, the release at the source). Beside it, the kvstore's own
 * share: the same session exported from one kvstore and imported into another directly by this
 * process (no compute in between).
 *
 * The physical ceiling of a move on one host is a memory copy of the session's bytes (a few
 * GB/s); a move here copies them several times (shared memory -> message -> HTTP/2 -> message ->
 * shared memory, twice through gRPC) and checksums them three times (CRC32C in TypeScript), so
 * the table gives MB/s next to the bytes moved. The load average is recorded before and after,
 * because the machine may be busy with other work.
 *
 *   npm run build:ts && node dist/bench/move.js [-- --tokens 500,2000,8000 --chunks 65536,1048576,4194304 --repeat 3]
 *
 * Writes bench/results/move-<date>.json (machine, git commit, date, node version, results).
 */
import { mkdirSync, writeFileSync } from "node:fs";
import os from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { credentials, Metadata } from "@grpc/grpc-js";
import { FreeKvClient } from "../packages/client/src/index.js";
import { KvStoreServiceClient, KvStoreTransferServiceClient, type ExportSessionResponse, type ImportSessionResponse } from "../proto/gen/freekv/v1/kvstore.js";
import { startService, startTiers } from "../tools/dev/launch.js";
import { gitCommit, machineInfo, resultsPath } from "./common.js";

const { values: args } = parseArgs({
  options: {
    tokens: { type: "string", default: "500,2000,8000" },
    chunks: { type: "string", default: "65536,1048576,4194304" },
    repeat: { type: "string", default: "3" },
    out: { type: "string" },
  },
});
const tokens = args.tokens.split(",").map(Number);
const chunks = args.chunks.split(",").map(Number);
const repeat = Number(args.repeat);
// The repository: two folders up from dist/bench/, one from bench/ (run from source with tsx).
const here = dirname(fileURLToPath(import.meta.url));
const root = import.meta.url.endsWith(".ts") ? join(here, "..") : join(here, "..", "..");
const env = { FREEKV_LOG_LEVEL: "warn", FREEKV_SHUTDOWN_GRACE_MS: "2000" };
const opt = { "grpc.max_receive_message_length": 64 << 20, "grpc.max_send_message_length": 64 << 20 };
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

const loadBefore = os.loadavg();
const a = await startTiers({ kvstoreEnv: env, computeEnv: env });
const b = await startTiers({ kvstoreEnv: env, computeEnv: env });
const kvc = await startService("kvstore", { env: { ...env, FREEKV_KVSTORE_PORT: "0", FREEKV_KVSTORE_METRICS_PORT: "0" } });
const client = new FreeKvClient(a.compute.address, { defaultDeadlineMs: 600_000 });
const rows: Array<Record<string, number>> = [];
try {
  for (const n of tokens) {
    const sid = `bench-move-${n}`;
    await client.createSession({ sessionId: sid, kind: 1, maxContextTokens: n + 64 });
    await client.generateText({ sessionId: sid, prompt: { $case: "tokens", value: { ids: Array.from({ length: n }, (_, k) => 3 + ((k * 7919) % 400)) } }, maxTokens: 2 });
    let at = a;
    for (const chunk of chunks) {
      const ms: number[] = [];
      let bytes = 0;
      for (let r = 0; r < repeat; r++) {
        const to = at === a ? b : a;
        const t0 = performance.now();
        const res = await client.moveSession({ sessionId: sid, target: to.compute.address, chunkBytes: chunk });
        ms.push(performance.now() - t0);
        bytes = res.dataBytes;
        at = to;
      }
      // The kvstore alone: export from the pod holding it, import into a third kvstore under the
      // same id (the digest covers the header, id included), released there after each copy.
      const kms: number[] = [];
      for (let r = 0; r < repeat; r++) {
        const src = new KvStoreTransferServiceClient(at.kvstore.address, credentials.createInsecure(), opt);
        const dst = new KvStoreTransferServiceClient(kvc.address, credentials.createInsecure(), opt);
        const t0 = performance.now();
        const id = sid;
        await new Promise<ImportSessionResponse>((resolve, reject) => {
          const imp = dst.importSession(new Metadata(), {}, (e, res) => (e ? reject(e) : resolve(res!)));
          const exp = src.exportSession({ sessionId: sid, chunkBytes: chunk }, new Metadata(), {});
          exp.on("data", (m: ExportSessionResponse) => {
            if (!imp.write(m)) exp.pause(), imp.once("drain", () => exp.resume());
          });
          exp.on("end", () => imp.end());
          exp.on("error", reject);
        });
        kms.push(performance.now() - t0);
        const kv = new KvStoreServiceClient(kvc.address, credentials.createInsecure());
        await new Promise((res) => kv.releaseSession({ sessionId: id, creationToken: "" }, (e) => res(e)));
        kv.close();
        src.close();
        dst.close();
      }
      const row = { tokens: n, chunkBytes: chunk, sessionBytes: bytes, moveMs: median(ms), moveMBps: bytes / 1e6 / (median(ms) / 1000), kvstoreMs: median(kms), kvstoreMBps: bytes / 1e6 / (median(kms) / 1000) };
      rows.push(row);
      console.log(
        `${String(n).padStart(6)} tokens  ${String(chunk).padStart(8)} B chunks  ${(bytes / 1e6).toFixed(2).padStart(7)} MB  move ${row.moveMs.toFixed(0).padStart(5)} ms (${row.moveMBps.toFixed(1)} MB/s)  kvstore->kvstore ${row.kvstoreMs.toFixed(0).padStart(5)} ms (${row.kvstoreMBps.toFixed(1)} MB/s)`,
      );
    }
    await client.closeSession({ sessionId: sid });
  }
} finally {
  client.close();
  await a.stop();
  await b.stop();
  await kvc.stop();
}
const commit = gitCommit(root);
const date = new Date().toISOString();
const out = args.out ?? resultsPath(root, "move");
mkdirSync(dirname(out), { recursive: true });
writeFileSync(
  out,
  JSON.stringify(
    {
      bench: "move",
      date,
      commit,
      machine: machineInfo(),
      loadAverage: { before: loadBefore, after: os.loadavg() },
      model: process.env.FREEKV_MODEL ?? "builtin",
      results: rows,
    },
    null,
    2,
  ),
);
console.log(`wrote ${out}`);
