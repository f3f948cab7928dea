/**
 * Starting the two tiers as child processes: used by `npm start` (run.ts), the demo and the
 * integration tests. Each service prints one JSON line {"ready": ..., "grpcPort": ...} on stdout
 * once it listens; everything else it prints is its JSON log, kept here for diagnostics. A
 * service is then waited for until its grpc.health.v1 says SERVING (compute: once its model is
 * loaded), unless the caller asks only for the listening process.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { createInterface } from "node:readline";
import { healthCheck } from "./health-probe.js";
import { joinHostPort } from "../../services/common/lifecycle.js";

export type ServiceName = "kvstore" | "compute";

export interface ServiceProcess {
  readonly name: ServiceName;
  readonly child: ChildProcess;
  readonly pid: number;
  readonly host: string;
  readonly grpcPort: number;
  readonly metricsPort: number;
  /** Port of compute's OpenAI-compatible HTTP front, when FREEKV_OPENAI_PORT turns it on. */
  readonly openaiPort?: number;
  /** host:port of the gRPC server. */
  readonly address: string;
  /** Lines printed so far (stdout and stderr), newest last. */
  readonly output: string[];
  /** Resolves when the process ends. */
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** Sends `signal` (default SIGTERM) and waits for the exit. */
  stop(signal?: NodeJS.Signals, timeoutMs?: number): Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

const here = dirname(fileURLToPath(import.meta.url));
const fromSource = import.meta.url.endsWith(".ts");

/**
 * The entry file of a service and the node arguments that run it (tsx for sources). `root`: another
 * built checkout whose `dist/services/<name>/main.js` runs instead (a benchmark against an earlier
 * build).
 */
export function serviceEntry(name: ServiceName, root?: string): { file: string; args: string[] } {
  if (root) {
    const other = join(root, "dist", "services", name, "main.js");
    if (!existsSync(other)) throw new Error(`${other} not found (build that checkout first)`);
    return { file: other, args: [other] };
  }
  const file = join(here, "..", "..", "services", name, fromSource ? "main.ts" : "main.js");
  if (!existsSync(file)) throw new Error(`${file} not found`);
  return { file, args: fromSource ? ["--import", "tsx", file] : [file] };
}

export interface StartOptions {
  env?: Record<string, string | undefined>;
  /** How long to wait for the ready line, and then for SERVING. */
  timeoutMs?: number;
  /** Wait until health says SERVING (default true); false: return once it listens. */
  serving?: boolean;
  /** Echo the child's output to this process's stderr. */
  echo?: boolean;
  /**
   * Own process group: a Ctrl-C at the terminal reaches only the supervisor, which then stops
   * the tiers in order (compute before the kvstore whose segments it maps).
   */
  detached?: boolean;
  /**
   * A command the service runs under, e.g. ["nsenter", "-t", pid, "-m", "--"] to run it in another
   * process's mount namespace (tests with a small private /dev/shm).
   */
  wrap?: string[];
  /** Another built checkout to run the service from (see serviceEntry). */
  root?: string;
}

/** Spawns a service and waits until it listens. Rejects (with its output) if it exits first. */
export async function startService(name: ServiceName, opts: StartOptions = {}): Promise<ServiceProcess> {
  const { args } = serviceEntry(name, opts.root);
  const env: Record<string, string | undefined> = { ...process.env, ...opts.env };
  const [cmd, ...cmdArgs] = opts.wrap?.length ? [...opts.wrap, process.execPath, ...args] : [process.execPath, ...args];
  const child = spawn(cmd, cmdArgs, { env: env as NodeJS.ProcessEnv, stdio: ["ignore", "pipe", "pipe"], detached: opts.detached ?? false });
  const output: string[] = [];
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.once("exit", (code, signal) => resolve({ code, signal }));
  });
  const keep = (line: string) => {
    output.push(line);
    if (output.length > 5000) output.shift();
    if (opts.echo) process.stderr.write(`[${name}] ${line}\n`);
  };
  createInterface({ input: child.stderr! }).on("line", keep);
  const ready = new Promise<{ grpcPort: number; metricsPort: number; openaiPort?: number; host: string }>((resolve, reject) => {
    createInterface({ input: child.stdout! }).on("line", (line) => {
      keep(line);
      if (line.startsWith('{"ready"')) {
        try {
          resolve(JSON.parse(line) as { grpcPort: number; metricsPort: number; openaiPort?: number; host: string });
        } catch (e) {
          reject(e as Error);
        }
      }
    });
    void exited.then(({ code, signal }) => reject(new Error(`${name} exited (code ${code}, signal ${signal}) before listening:\n${output.join("\n")}`)));
    const t = setTimeout(() => reject(new Error(`${name} did not listen within ${opts.timeoutMs ?? 30000} ms:\n${output.join("\n")}`)), opts.timeoutMs ?? 30000);
    t.unref();
  });
  let info: { grpcPort: number; metricsPort: number; openaiPort?: number; host: string };
  try {
    info = await ready;
  } catch (e) {
    child.kill("SIGKILL");
    throw e;
  }
  const host = info.host === "0.0.0.0" ? "127.0.0.1" : info.host;
  if (opts.serving !== false) {
    try {
      await waitServing(joinHostPort(host, info.grpcPort), opts.timeoutMs ?? 30000, exited);
    } catch (e) {
      child.kill("SIGKILL");
      throw new Error(`${name}: ${(e as Error).message}:\n${output.join("\n")}`);
    }
  }
  return {
    name,
    child,
    pid: child.pid!,
    host,
    grpcPort: info.grpcPort,
    metricsPort: info.metricsPort,
    openaiPort: info.openaiPort,
    address: joinHostPort(host, info.grpcPort),
    output,
    exited,
    async stop(signal: NodeJS.Signals = "SIGTERM", timeoutMs = 30000) {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      const t = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
      const r = await exited;
      clearTimeout(t);
      return r;
    },
  };
}

/** Polls grpc.health.v1 Check until SERVING. */
async function waitServing(address: string, timeoutMs: number, exited: Promise<unknown>): Promise<void> {
  let gone = false;
  void exited.then(() => (gone = true));
  const t0 = Date.now();
  let last = "";
  for (;;) {
    if (gone) throw new Error("exited before serving");
    last = await healthCheck(address).catch((e: Error) => e.message);
    if (last === "SERVING") return;
    if (Date.now() - t0 > timeoutMs) throw new Error(`not SERVING within ${timeoutMs} ms (health: ${last})`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

export interface Tiers {
  kvstore: ServiceProcess;
  compute: ServiceProcess;
  stop(signal?: NodeJS.Signals): Promise<void>;
}

/** Starts the kvstore, then compute pointed at it; both on ephemeral ports unless env says otherwise. */
export async function startTiers(
  opts: { kvstoreEnv?: Record<string, string | undefined>; computeEnv?: Record<string, string | undefined>; echo?: boolean; timeoutMs?: number; detached?: boolean; wrap?: string[]; root?: string } = {},
): Promise<Tiers> {
  const kvstore = await startService("kvstore", {
    env: { FREEKV_KVSTORE_PORT: "0", FREEKV_KVSTORE_METRICS_PORT: "0", ...opts.kvstoreEnv },
    echo: opts.echo,
    timeoutMs: opts.timeoutMs,
    detached: opts.detached,
    wrap: opts.wrap,
    root: opts.root,
  });
  let compute: ServiceProcess;
  try {
    compute = await startService("compute", {
      env: { FREEKV_COMPUTE_PORT: "0", FREEKV_COMPUTE_METRICS_PORT: "0", FREEKV_KVSTORE_ADDR: kvstore.address, ...opts.computeEnv },
      echo: opts.echo,
      timeoutMs: opts.timeoutMs,
      detached: opts.detached,
      wrap: opts.wrap,
      root: opts.root,
    });
  } catch (e) {
    await kvstore.stop();
    throw e;
  }
  return {
    kvstore,
    compute,
    // Compute first: it releases nothing at shutdown but must stop using the segments before
    // the kvstore removes them.
    async stop(signal: NodeJS.Signals = "SIGTERM") {
      await compute.stop(signal);
      await kvstore.stop(signal);
    },
  };
}
