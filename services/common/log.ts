/**
 * Structured logs: one JSON object per line on stdout, tagged with the service name, so both
 * containers of a pod can be read by the same collector.
 */
import { pino, type Logger } from "pino";

export type { Logger };

export function createLogger(service: string, level: string = process.env.FREEKV_LOG_LEVEL ?? "info"): Logger {
  return pino({
    name: service,
    level,
    base: { service, pid: process.pid },
    timestamp: pino.stdTimeFunctions.isoTime,
  });
}
