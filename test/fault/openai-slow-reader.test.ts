/**
 * The OpenAI front's streams to readers that are slow or pause, with real processes in a private
 * network namespace whose TCP buffers are 4 KiB (skipped where `unshare -n` is not
 * permitted), so a reader that pauses fills the front's socket within seconds: an error after the
 * stream started (a deadline passing while the client paused for less than
 * FREEKV_WRITE_STALL_MS) is still the stream's last event, and a drain lets a slow reader's
 * response flush to its end (the final chunk and `[DONE]`) before it closes the connection.
 */
import { spawnSync } from "node:child_process";
import { describe, expect, it } from "vitest";

const SMALL_BUFFERS = 'ip link set lo up && echo "4096 4096 4096" > /proc/sys/net/ipv4/tcp_wmem && echo "4096 4096 4096" > /proc/sys/net/ipv4/tcp_rmem';
const canUnshare = spawnSync("unshare", ["-n", "sh", "-c", SMALL_BUFFERS], { stdio: "ignore" }).status === 0;
if (!canUnshare) console.log("openai-slow-reader: skipped: unshare -n (a private network namespace) is not permitted on this machine");
const seed = Number(process.env.FREEKV_TEST_SEED ?? Date.now() % 1e9);

function inSmallBuffers(mode: string): { events?: number; last?: string; reset?: boolean; streams?: { events: number; last?: string; finish?: string; reset: boolean }[]; computeExit?: number | null } {
  const r = spawnSync("unshare", ["-n", "sh", "-c", `${SMALL_BUFFERS} && exec node_modules/.bin/tsx test/helpers/openai-slow-reader.ts ${mode} ${seed}`], { encoding: "utf8", timeout: 90_000 });
  const line = r.stdout.trim().split("\n").at(-1) ?? "";
  if (!line.startsWith("{")) throw new Error(`the client run printed no result (status ${r.status}): ${r.stderr.slice(-2000)}`);
  return JSON.parse(line);
}

describe.skipIf(!canUnshare)("OpenAI front: slow and pausing readers", () => {
  it("an error after the stream started is its last event, even when the client had stopped reading for a while", () => {
    const r = inSmallBuffers("error");
    expect(r.reset, `seed ${seed}`).toBe(false);
    expect(r.events).toBeGreaterThan(1);
    expect(JSON.parse(r.last!.slice("data: ".length))).toMatchObject({ error: { code: "deadline_exceeded" } });
  }, 100_000);

  it("a drain lets slow readers' responses flush to their end before it closes the connections", () => {
    const r = inSmallBuffers("drain");
    expect(r.computeExit, `seed ${seed}`).toBe(0);
    for (const s of r.streams!) {
      expect(s.reset).toBe(false);
      expect(s.last).toBe("data: [DONE]");
      // Before it the final chunk (the generation ran to its 600 tokens), then the usage.
      expect(JSON.parse(s.finish!.slice("data: ".length))).toMatchObject({ choices: [{ finish_reason: "length" }] });
    }
  }, 100_000);
});
