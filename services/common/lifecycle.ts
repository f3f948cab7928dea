/**
 * Server lifecycle: bind, then on SIGTERM/SIGINT drain: health NOT_SERVING (the load balancer
 * stops sending), tryShutdown (no new calls, in-flight ones finish, those of an in-process front
 * too), and after the grace period
 * abort what is still running and forceShutdown; then the service's own cleanup, then exit 0.
 * A second signal during the drain skips the rest of the grace period.
 */
import { isIPv6 } from "node:net";
import { Server, ServerCredentials } from "@grpc/grpc-js";
import { abortAllCalls, inflightCalls } from "./cancellation.js";
import type { Health } from "./health.js";
import { stopLogRetries, type Logger } from "./log.js";

/** How long the drain waits for the calls it cancelled to end before its cleanup. */
const CANCELLED_CALLS_WAIT_MS = 2_000;

/** `host:port` as gRPC reads it: an IPv6 host (`::`, `fd00::5`) in brackets. */
export function joinHostPort(host: string, port: number): string {
  return isIPv6(host) ? `[${host}]:${port}` : `${host}:${port}`;
}

export async function bindServer(server: Server, host: string, port: number, creds: ServerCredentials = ServerCredentials.createInsecure()): Promise<number> {
  const address = joinHostPort(host, port);
  return new Promise((resolve, reject) => {
    server.bindAsync(address, creds, (err, actual) => {
      if (err) reject(new Error(`cannot listen on ${address}: ${err.message}`));
      else resolve(actual);
    });
  });
}

export interface DrainOptions {
  server: Server;
  health: Health;
  log: Logger;
  /** How long in-flight calls may run after the drain starts. */
  graceMs: number;
  /** Service cleanup after the server stopped (release segments, close clients, metrics server). */
  cleanup?: () => Promise<void>;
  /** Exit the process when done (default true; false for in-process use). */
  exit?: boolean;
}

export interface Drainer {
  drain(reason: string): Promise<void>;
}

export function installDrain(opts: DrainOptions): Drainer {
  let draining: Promise<void> | undefined;
  let hurry: (() => void) | undefined;

  const drain = (reason: string): Promise<void> => {
    if (draining) {
      hurry?.();
      return draining;
    }
    draining = (async () => {
      const t0 = Date.now();
      opts.log.info({ reason, inflight: inflightCalls(), graceMs: opts.graceMs }, "draining");
      opts.health.shutdown();
      // Calls served in process beside the gRPC server (an HTTP front) hold a call scope too:
      // the drain is clean once the server stopped and no scope is left.
      let over = false;
      const graceful = new Promise<boolean>((resolve) => {
        opts.server.tryShutdown(() => {
          const idle = () => (inflightCalls() === 0 ? resolve(true) : over ? undefined : void setTimeout(idle, 20));
          idle();
        });
      });
      const late = new Promise<boolean>((resolve) => {
        const timer = setTimeout(() => resolve(false), opts.graceMs);
        hurry = () => {
          clearTimeout(timer);
          resolve(false);
        };
      });
      const clean = await Promise.race([graceful, late]);
      over = true;
      if (!clean) {
        opts.log.warn({ inflight: inflightCalls() }, "grace period over: cancelling in-flight calls");
        abortAllCalls();
        // The cancelled handlers end their own way (a stateless request releases its session at
        // the kvstore) and send their status, UNAVAILABLE, which clients retry elsewhere: waited
        // for, briefly, before forceShutdown resets whatever is left (the client would see
        // CANCELLED, which it does not retry) and before the cleanup and the exit.
        const t = Date.now();
        while (inflightCalls() > 0 && Date.now() - t < CANCELLED_CALLS_WAIT_MS) await new Promise((r) => setTimeout(r, 10));
        if (inflightCalls() > 0) opts.log.warn({ inflight: inflightCalls(), waitedMs: CANCELLED_CALLS_WAIT_MS }, "cancelled calls still running at the cleanup");
        // A moment for the statuses just written to leave before the transports are reset.
        await new Promise((r) => setTimeout(r, 50));
        opts.server.forceShutdown();
      }
      try {
        await opts.cleanup?.();
      } catch (e) {
        opts.log.error({ err: e }, "cleanup failed");
      }
      opts.log.info({ ms: Date.now() - t0, clean }, "stopped");
      if (opts.exit !== false) {
        // Let pino flush its last line before exiting.
        setImmediate(() => {
          stopLogRetries();
          process.exit(0);
        });
      }
    })();
    return draining;
  };

  for (const sig of ["SIGTERM", "SIGINT"] as const) {
    process.on(sig, () => void drain(sig));
  }
  return { drain };
}
