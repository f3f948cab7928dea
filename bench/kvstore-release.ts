/**
 * What releasing a long session costs the kvstore's other callers: a session of --gib GiB of host
 * KV (its memory committed, every page touched through a second mapping as compute's writes touch
 * it) is released, and at the same moment another session is created; both are timed. The kvstore
 * runs in this process (services/kvstore/store.ts over the in-memory directory, the code the
 * kvstore process runs), so a release that unmapped on the event loop would hold the other call
 * back for the whole unmap.
 *
 *   npm run build:ts && npm run bench:kvstore-release [-- --gib 2 --rounds 5 --out FILE.json]
 *
 * Writes JSON (machine, commit, date, results) to --out, or bench/results/kvstore-release-<date>.json.
 */
import { mkdirSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { loadShm } from "../native/shm.js";
import { createLogger } from "../services/common/log.js";
import { MemoryDirectory } from "../services/kvstore/directory.js";
import { KvStore } from "../services/kvstore/store.js";
import { gitCommit, machineInfo, percentile, resultsPath } from "./common.js";

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, "..", here.includes(`${join("dist", "bench")}`) ? ".." : "");
const { values: args } = parseArgs({ options: { gib: { type: "string", default: "2" }, rounds: { type: "string", default: "5" }, out: { type: "string" } } });
const gib = Number(args.gib);
const rounds = Number(args.rounds);
if (!(gib > 0 && gib <= 64) || !(Number.isInteger(rounds) && rounds >= 1)) throw new RangeError("--gib must be in (0, 64] and --rounds an integer >= 1");

// 32 layers x 4 KV heads x head dim 128 in float32: 128 KiB of KV a token, an 8B model's bf16 size.
const G = { layers: 32, queryHeads: 32, kvHeads: 4, headDim: 128, kvDtype: 1 };
const R = { pageSize: 16, sinkTokens: 16, windowTokens: 16, selectTokens: 32 };
const tokens = Math.floor((gib * 2 ** 30) / (128 * 1024));
const store = new KvStore(new MemoryDirectory(), Math.ceil((gib + 1) * 2 ** 30), createLogger("bench", "silent"), undefined, false, 2048);
const { ShmSegment } = loadShm();
const releaseMs: number[] = [];
const otherMs: number[] = [];
for (let r = 0; r < rounds; r++) {
  const a = await store.attach({ sessionId: "long", geometry: G, retrieval: R as never, maxContextTokens: tokens, metadata: Buffer.alloc(0), reserveTokens: tokens });
  const seg = ShmSegment.open(a.store!.name);
  for (let off = 0; off < seg.size; off += 256 << 20) {
    const n = Math.min(256 << 20, seg.size - off);
    const b = new Uint8Array(seg.buffer(off, n));
    for (let i = 0; i < n; i += 4096) b[i] = 1;
  }
  seg.close();
  const t0 = performance.now();
  const released = store.release("long").then(() => performance.now() - t0);
  const other = store.attach({ sessionId: "short", geometry: G, retrieval: R as never, maxContextTokens: 1024, metadata: Buffer.alloc(0), reserveTokens: 1024 }).then(() => performance.now() - t0);
  const [rel, oth] = await Promise.all([released, other]);
  releaseMs.push(rel);
  otherMs.push(oth);
  await store.release("short");
  process.stderr.write(`round ${r + 1}: release of ${gib} GiB ${rel.toFixed(0)} ms; another session created meanwhile in ${oth.toFixed(0)} ms\n`);
}
await store.shutdown(false);
const med = (v: number[]) => percentile(v, 0.5) ?? NaN;
const table = [
  "| session released | release ms (median) | another session's creation meanwhile, ms (median, max) |",
  "| ---: | ---: | ---: |",
  `| ${gib} GiB | ${med(releaseMs).toFixed(0)} | ${med(otherMs).toFixed(0)}, ${Math.max(...otherMs).toFixed(0)} |`,
];
console.log(table.join("\n"));
const out = args.out ?? resultsPath(root, "kvstore-release");
mkdirSync(dirname(out), { recursive: true });
writeFileSync(out, JSON.stringify({ what: "a long session's release and another session's creation at the same moment, kvstore in process", date: new Date().toISOString(), commit: gitCommit(root), machine: machineInfo(), gib, rounds, releaseMs, otherMs }, null, 2));
process.stderr.write(`wrote ${out}\n`);
