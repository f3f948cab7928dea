/**
 * What closing a long session costs compute's event loop: a session of --gib GiB of host KV (an
 * 8B model's shape in float32, its store touched through compute's mapping as its offloads touch
 * it) is closed as compute closes it, the engine session and then its four segments, either on
 * the event loop (closeSession, close(): how compute closed sessions before) or on worker threads
 * (closeSessionAsync, closeAsync: what SessionManager.detach does now). Reported: how long the
 * event loop could not turn (the longest gap between 1 ms ticks, or the synchronous call itself)
 * and how long the close took. The CPU engine; the CUDA engine adds the unregistration of the
 * store to the engine's part.
 *
 *   npm run build:ts && npm run bench:session-close [-- --gib 2 --rounds 3 --out FILE.json]
 *
 * Writes JSON (machine, commit, date, results) to --out, or bench/results/session-close-<date>.json.
 */
import { mkdirSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { loadAddon } from "../native/binding.js";
import { DType } from "../proto/gen/freekv/v1/common.js";
import { retrievalDefaults } from "../services/common/retrieval.js";
import { attachLocalHost } from "../services/compute/model/localHost.js";
import { gitCommit, machineInfo, percentile, resultsPath } from "./common.js";

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, "..", here.includes(`${join("dist", "bench")}`) ? ".." : "");
const { values: args } = parseArgs({ options: { gib: { type: "string", default: "2" }, rounds: { type: "string", default: "3" }, out: { type: "string" } } });
const gib = Number(args.gib);
const rounds = Number(args.rounds);
if (!(gib > 0 && gib <= 64) || !(Number.isInteger(rounds) && rounds >= 1)) throw new RangeError("--gib must be in (0, 64] and --rounds an integer >= 1");

const G = { layers: 32, qHeads: 32, kvHeads: 8, headDim: 128, kvDtype: DType.D_TYPE_FLOAT32 };
const R = { ...retrievalDefaults(), denseLayers: [...retrievalDefaults().denseLayers] };
const pageBytes = G.kvHeads * 2 * R.pageSize * G.headDim * 4;
const capacityPages = Math.max(1, Math.floor((gib * 2 ** 30) / (G.layers * pageBytes)));
const addon = loadAddon();
const engine = new addon.Engine({ backend: "cpu", threads: 2 });

async function once(async: boolean): Promise<{ stallMs: number; closeMs: number }> {
  const local = attachLocalHost(G, R, capacityPages, "bench");
  try {
    const store = new Uint8Array(local.host.store.buffer());
    for (let i = 0; i < store.length; i += 4096) store[i] = 1;
    const s = engine.createSession(G, R, local.host, false);
    const segs = [local.host.store, local.host.staging, local.host.tail, local.host.manifest];
    const t0 = performance.now();
    if (!async) {
      engine.closeSession(s);
      for (const seg of segs) seg.close();
      const ms = performance.now() - t0;
      return { stallMs: ms, closeMs: ms };
    }
    let last = performance.now();
    let gap = 0;
    const tick = setInterval(() => {
      const now = performance.now();
      gap = Math.max(gap, now - last);
      last = now;
    }, 1);
    await engine.closeSessionAsync(s);
    await Promise.all(segs.map((seg) => seg.closeAsync()));
    const closeMs = performance.now() - t0;
    gap = Math.max(gap, performance.now() - last);
    clearInterval(tick);
    return { stallMs: gap, closeMs };
  } finally {
    await local.release();
  }
}

const results: Record<string, unknown>[] = [];
const med = (v: number[]) => percentile(v, 0.5) ?? NaN;
const table = ["| close | event loop held, ms (median, max) | close took, ms (median) |", "| --- | ---: | ---: |"];
for (const async of [false, true, false, true]) {
  const stall: number[] = [];
  const took: number[] = [];
  for (let r = 0; r < rounds; r++) {
    const x = await once(async);
    stall.push(x.stallMs);
    took.push(x.closeMs);
  }
  const name = async ? "closeSessionAsync + closeAsync (workers)" : "closeSession + close (event loop)";
  results.push({ close: name, stallMs: stall, closeMs: took });
  table.push(`| ${name} | ${med(stall).toFixed(1)}, ${Math.max(...stall).toFixed(1)} | ${med(took).toFixed(0)} |`);
  process.stderr.write(`${name}: held ${stall.map((x) => x.toFixed(1)).join(", ")} ms\n`);
}
console.log(`session of ${((capacityPages * G.layers * pageBytes) / 2 ** 30).toFixed(2)} GiB (store touched through compute's mapping), CPU engine`);
console.log(table.join("\n"));
const out = args.out ?? resultsPath(root, "session-close");
mkdirSync(dirname(out), { recursive: true });
writeFileSync(out, JSON.stringify({ what: "closing a long session in compute: event-loop stall, sync against worker threads", date: new Date().toISOString(), commit: gitCommit(root), machine: machineInfo(), gib, rounds, storeBytes: capacityPages * G.layers * pageBytes, results, table }, null, 2));
process.stderr.write(`wrote ${out}\n`);
