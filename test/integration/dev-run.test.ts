/**
 * `npm start` (tools/dev/run.ts): both tiers as separate processes, their addresses printed,
 * Ctrl-C (SIGINT to the supervisor alone) drains compute and then the kvstore, exit 0.
 */
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { describe, expect, it } from "vitest";
import { healthCheck } from "../helpers/grpc-probes.js";

const alive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

describe("npm start", () => {
  it("prints where both tiers listen, serves, and stops both on SIGINT with exit 0", async () => {
    const child = spawn(process.execPath, ["--import", "tsx", "tools/dev/run.ts"], {
      env: { ...process.env, FREEKV_COMPUTE_PORT: "0", FREEKV_COMPUTE_METRICS_PORT: "0", FREEKV_KVSTORE_PORT: "0", FREEKV_KVSTORE_METRICS_PORT: "0", FREEKV_LOG_LEVEL: "warn", FREEKV_MODEL: "none" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
    const lines: string[] = [];
    createInterface({ input: child.stderr! }).on("line", (l) => lines.push(l));
    const listening = await new Promise<Record<string, { pid: number; address: string }>>((resolve, reject) => {
      const found: Record<string, { pid: number; address: string }> = {};
      createInterface({ input: child.stdout! }).on("line", (l) => {
        lines.push(l);
        const m = /^\s+(compute|kvstore)\s+pid (\d+)\s+gRPC (\S+)/.exec(l);
        if (m) found[m[1]] = { pid: Number(m[2]), address: m[3] };
        if (found.compute && found.kvstore) resolve(found);
      });
      void exited.then((code) => reject(new Error(`run.ts exited ${code}:\n${lines.join("\n")}`)));
    });
    expect(listening.compute.pid).not.toBe(listening.kvstore.pid);
    expect(await healthCheck(listening.compute.address)).toBe("SERVING");
    expect(await healthCheck(listening.kvstore.address)).toBe("SERVING");
    child.kill("SIGINT");
    expect(await exited).toBe(0);
    expect(lines.join("\n")).toMatch(/compute exited 0, kvstore exited 0/);
    expect(alive(listening.compute.pid)).toBe(false);
    expect(alive(listening.kvstore.pid)).toBe(false);
  });
});
