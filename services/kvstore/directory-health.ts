/**
 * The kvstore is only as ready as its session directory: a commit or attach that cannot be
 * recorded there fails (UNAVAILABLE), so while the directory does not answer the kvstore reports
 * NOT_SERVING (and compute, which follows the kvstore's health, does too). A probe pings the
 * directory every `intervalMs`; a failed directory operation flips the status at once.
 */
import type { Health } from "../common/health.js";
import type { Logger } from "../common/log.js";
import type { SessionDirectory } from "./directory.js";
import type { KvStoreMetrics } from "./metrics.js";

export interface DirectoryHealth {
  readonly up: boolean;
  /** A directory operation failed. */
  failed(err: Error): void;
  stop(): void;
}

export function watchDirectory(directory: SessionDirectory, health: Health, log: Logger, metrics: KvStoreMetrics, intervalMs: number): DirectoryHealth {
  let up = true;
  let stopped = false;
  const set = (ok: boolean, why?: string) => {
    metrics.directoryUp.set(ok ? 1 : 0);
    if (ok === up) return;
    up = ok;
    if (ok) log.info({ directory: directory.kind }, "session directory answers again; serving");
    else log.error({ directory: directory.kind, err: why }, "session directory unreachable; NOT_SERVING until it answers");
    health.set(ok ? "SERVING" : "NOT_SERVING");
  };
  const probe = async () => {
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([
        directory.ping(),
        new Promise((_, reject) => {
          timer = setTimeout(() => reject(new Error(`no answer in ${intervalMs} ms`)), intervalMs);
        }),
      ]);
      if (!stopped) set(true);
    } catch (e) {
      if (!stopped) set(false, (e as Error).message);
    } finally {
      clearTimeout(timer);
    }
  };
  metrics.directoryUp.set(1);
  let running = false;
  const timer = setInterval(() => {
    if (running) return;
    running = true;
    void probe().finally(() => (running = false));
  }, intervalMs);
  timer.unref();
  return {
    get up() {
      return up;
    },
    failed(err) {
      set(false, err.message);
    },
    stop() {
      stopped = true;
      clearInterval(timer);
    },
  };
}
