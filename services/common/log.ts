/**
 * Structured logs: one JSON object per line on stdout, tagged with the service name and with the
 * level as a string ("level":"info"), so both containers of a pod can be read by the same collector.
 *
 * Writes are synchronous; a full stdout pipe is retried (the line is not lost) until the process
 * starts exiting. From then on, a reader that went away (a supervisor killed without stopping
 * its children) makes the remaining lines drop instead of holding the exit forever.
 */
import { pino, type Logger } from "pino";

export type { Logger };

let exiting = false;

/** Called by the lifecycle just before process.exit. */
export function stopLogRetries(): void {
  exiting = true;
}

/** `level`: the service's FREEKV_LOG_LEVEL, from its validated config. */
export function createLogger(service: string, level = "info"): Logger {
  const dest = pino.destination({ dest: 1, sync: true, retryEAGAIN: () => !exiting });
  dest.on("error", () => {
    /* stdout is gone: nothing left to tell */
  });
  return pino(
    {
      name: service,
      level,
      base: { service, pid: process.pid },
      timestamp: pino.stdTimeFunctions.isoTime,
      // "info", "warn", ... rather than pino's numbers: what log collectors and people filter on.
      formatters: { level: (label) => ({ level: label }) },
    },
    dest,
  );
}
