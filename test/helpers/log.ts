/**
 * A logger formatted as services/common/log.ts formats it (string levels), whose lines are pushed,
 * parsed, into `lines` for a test to read.
 */
import { Writable } from "node:stream";
import { pino, type Logger } from "pino";

export function capturedLogger(lines: Array<Record<string, unknown>>, name = "compute", level = "warn"): Logger {
  const sink = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const l of String(chunk).split("\n")) if (l.trim()) lines.push(JSON.parse(l) as Record<string, unknown>);
      done();
    },
  });
  return pino({ name, level, base: { service: name }, formatters: { level: (label) => ({ level: label }) } }, sink);
}
