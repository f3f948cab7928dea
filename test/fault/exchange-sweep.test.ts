/**
 * A compute process killed without its exit hook leaves its Attention tensor exchanges in
 * /dev/shm. The next compute removes those whose creator is gone (pid not running, or the pid
 * now belongs to a process with another start time) and leaves a live process's alone.
 */
import { existsSync, readFileSync, readdirSync } from "node:fs";
import { afterAll, describe, expect, it } from "vitest";
import { loadAddon } from "../../native/binding.js";
import { QUIET, startTiers, type Tiers } from "../helpers/services.js";

const addon = loadAddon();
let tiers: Tiers | undefined;
const made: string[] = [];

afterAll(async () => {
  await tiers?.stop();
  for (const n of made) addon.ShmSegment.unlink(n);
});

function startTime(pid: number): string {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  return stat.slice(stat.lastIndexOf(")") + 2).split(" ")[19];
}

function segment(name: string): string {
  addon.ShmSegment.create(name, 4096).close();
  made.push(name);
  return name;
}

describe("stale tensor exchanges", () => {
  it("are removed when compute starts; a live creator's are kept", async () => {
    const running = new Set(readdirSync("/proc").filter((d) => /^\d+$/.test(d)).map(Number));
    let dead = 400000 + (process.pid % 1000);
    while (running.has(dead)) dead++;
    const hex = () => Math.floor(Math.random() * 2 ** 48).toString(16).padStart(12, "0");
    const gone = segment(`/freekv-xch-${dead}-12345-${hex()}`);
    const reused = segment(`/freekv-xch-${process.pid}-1-${hex()}`); // our pid, another start time
    const live = segment(`/freekv-xch-${process.pid}-${startTime(process.pid)}-${hex()}`);
    const other = segment(`/freekv-test-keep-${hex()}`); // not an exchange name

    tiers = await startTiers({ kvstoreEnv: QUIET, computeEnv: QUIET });

    expect(existsSync(`/dev/shm${gone}`)).toBe(false);
    expect(existsSync(`/dev/shm${reused}`)).toBe(false);
    expect(existsSync(`/dev/shm${live}`)).toBe(true);
    expect(existsSync(`/dev/shm${other}`)).toBe(true);
  });
});
