/**
 * Run inside a private network namespace with small TCP buffers (openai-slow-reader.test.ts): both
 * tiers with the OpenAI front, then one streamed completion read by a raw HTTP/1.1 client that
 * reads slowly or stops reading for a while, so the front's socket buffers fill within seconds.
 * Prints one JSON line: what the client read, and how the compute process ended where it was
 * stopped. Argument: `error` (a deadline passes while the client pauses for less than
 * FREEKV_WRITE_STALL_MS) or `drain` (SIGTERM while four slow readers are still being written to).
 */
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { startTiers } from "../../tools/dev/launch.js";

const mode = process.argv[2];
const seed = Number(process.argv[3] ?? 1);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** The built-in model without EOS: every generation runs to max_tokens. */
function builtinWithoutEos(): string {
  const from = join(process.cwd(), "models", "builtin");
  const dir = mkdtempSync(join(tmpdir(), "freekv-slow-reader-"));
  for (const f of ["model.safetensors", "tokenizer.json", "tokenizer_config.json"]) copyFileSync(join(from, f), join(dir, f));
  const cfg = JSON.parse(readFileSync(join(from, "config.json"), "utf8"));
  writeFileSync(join(dir, "config.json"), JSON.stringify({ ...cfg, eos_token_id: [] }));
  const gc = JSON.parse(readFileSync(join(from, "generation_config.json"), "utf8"));
  delete gc.eos_token_id;
  writeFileSync(join(dir, "generation_config.json"), JSON.stringify(gc));
  return dir;
}

/** What the client takes at a time. */
const CHUNK = 1024;

/** Streams a completion; `read` decides when the client takes the next CHUNK bytes. Resolves with the events read. */
function complete(port: number, body: unknown, headers: Record<string, string>, read: (take: () => void) => void): Promise<{ events: string[]; reset: boolean }> {
  return new Promise((resolve) => {
    const s = connect(port, "127.0.0.1");
    const json = JSON.stringify(body);
    const extra = Object.entries(headers).map(([k, v]) => `${k}: ${v}\r\n`).join("");
    s.write(`POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(json)}\r\n${extra}\r\n${json}`);
    s.pause();
    const parts: Buffer[] = [];
    let reset = false;
    read(() => {
      const b: Buffer | null = s.read(CHUNK) ?? s.read();
      if (b) parts.push(b);
    });
    s.on("error", () => (reset = true));
    s.on("close", () => {
      let b: Buffer | null;
      while ((b = s.read()) !== null) parts.push(b);
      const text = Buffer.concat(parts).toString("utf8");
      resolve({ events: text.split("\n").filter((l) => l.startsWith("data: ")), reset });
    });
  });
}

const model = builtinWithoutEos();
const tiers = await startTiers({
  kvstoreEnv: { FREEKV_LOG_LEVEL: "warn" },
  computeEnv: { FREEKV_LOG_LEVEL: "warn", FREEKV_THREADS: "1", FREEKV_MODEL: model, FREEKV_MAX_CONTEXT_TOKENS: "16384", FREEKV_OPENAI_PORT: "0", FREEKV_SHUTDOWN_GRACE_MS: "60000", FREEKV_WRITE_STALL_MS: "30000" },
});
const port = tiers.compute.openaiPort!;
const prompt = Array.from({ length: 8 }, (_, i) => 3 + ((seed * 7919 + i * 104729) % 400));
let result: Record<string, unknown>;
try {
  if (mode === "error") {
    // Stops reading for 6 s (less than FREEKV_WRITE_STALL_MS) while its 3 s deadline passes, then reads on.
    const r = await complete(port, { prompt, max_tokens: 12000, temperature: 0, stream: true, ignore_eos: true }, { "x-freekv-timeout-ms": "3000" }, (take) => {
      void (async () => {
        await sleep(6000);
        for (;;) {
          take();
          await sleep(1);
        }
      })();
    });
    result = { events: r.events.length, last: r.events.at(-1), reset: r.reset };
  } else {
    // Four streams, each taking 1 KiB every 50 ms (~5 s for a whole response, longer than the
    // generation takes); the service is stopped 1 s in and finishes the generations meanwhile.
    let stop = false;
    const readings = [0, 1, 2, 3].map((k) =>
      complete(port, { prompt: prompt.map((t) => 3 + ((t + k * 31) % 400)), max_tokens: 600, temperature: 0, ignore_eos: true, stream: true, stream_options: { include_usage: true } }, {}, (take) => {
        void (async () => {
          while (!stop) {
            take();
            await sleep(50);
          }
        })();
      }),
    );
    await sleep(1000);
    tiers.compute.child.kill("SIGTERM");
    const exited = (await tiers.compute.exited).code;
    const rs = await Promise.all(readings);
    stop = true;
    result = { streams: rs.map((r) => ({ events: r.events.length, last: r.events.at(-1), finish: r.events.at(-3), reset: r.reset })), computeExit: exited };
  }
} finally {
  await tiers.stop().catch(() => undefined);
  rmSync(model, { recursive: true, force: true });
}
process.stdout.write(`${JSON.stringify(result!)}\n`);
process.exit(0);
