/**
 * Typed service errors and their gRPC status. Handlers throw ServiceError with the status the
 * caller should see; an aborted call is CANCELLED (or DEADLINE_EXCEEDED); an error that already
 * carries a gRPC status (from a downstream call, e.g. the kvstore) keeps it; anything else is a
 * bug and becomes INTERNAL with a log line, never a crash.
 */
import { status, Metadata, type StatusObject } from "@grpc/grpc-js";
import type { Logger } from "./log.js";

export class ServiceError extends Error {
  constructor(
    readonly code: status,
    message: string,
    /** Trailing metadata sent with the status (e.g. where a session is held). */
    readonly trailers?: Record<string, string>,
  ) {
    super(message);
    this.name = "ServiceError";
  }
}

function trailersOf(e: ServiceError): Metadata {
  const md = new Metadata();
  for (const [k, v] of Object.entries(e.trailers ?? {})) md.set(k, v);
  return md;
}

/** Longest client-supplied string (a session id, a name) echoed in an error message. */
export const MAX_ECHO_CHARS = 128;

/** A client string for an error message: JSON-quoted and cut to MAX_ECHO_CHARS characters (with its length when cut). */
export function quoteId(v: string): string {
  if (v.length <= MAX_ECHO_CHARS) return JSON.stringify(v);
  return `${JSON.stringify(v.slice(0, MAX_ECHO_CHARS))}... (${v.length} characters)`;
}

/** INVALID_ARGUMENT whose message starts with the offending field, e.g. "decode.items[2].q". */
export const invalidArgument = (field: string, message: string) => new ServiceError(status.INVALID_ARGUMENT, `${field}: ${message}`);
export const notFound = (message: string) => new ServiceError(status.NOT_FOUND, message);
export const failedPrecondition = (message: string) => new ServiceError(status.FAILED_PRECONDITION, message);
export const resourceExhausted = (message: string) => new ServiceError(status.RESOURCE_EXHAUSTED, message);
/** The trailer that marks a RESOURCE_EXHAUSTED as permanent: the request can never fit this service, waiting or retrying will not help. */
export const NEVER_FITS_TRAILER = "freekv-never-fits";
/** RESOURCE_EXHAUSTED for a request larger than the service's whole capacity (the HTTP front answers it 400, not 429 with Retry-After). */
export const neverFits = (message: string) => new ServiceError(status.RESOURCE_EXHAUSTED, message, { [NEVER_FITS_TRAILER]: "1" });
export const unavailable = (message: string) => new ServiceError(status.UNAVAILABLE, message);
export const unimplemented = (message: string) => new ServiceError(status.UNIMPLEMENTED, message);
export const alreadyExists = (message: string) => new ServiceError(status.ALREADY_EXISTS, message);

const passThrough = new Set<number>([
  status.INVALID_ARGUMENT,
  status.NOT_FOUND,
  status.FAILED_PRECONDITION,
  status.RESOURCE_EXHAUSTED,
  status.UNAVAILABLE,
  status.UNIMPLEMENTED,
  status.ALREADY_EXISTS,
  status.CANCELLED,
  status.DEADLINE_EXCEEDED,
  status.DATA_LOSS,
  status.ABORTED,
  status.OUT_OF_RANGE,
]);

/** Error raised by a gRPC client call (has a numeric code and details). */
function isGrpcClientError(e: unknown): e is { code: number; details: string; message: string } {
  return typeof e === "object" && e !== null && typeof (e as { code?: unknown }).code === "number" && typeof (e as { details?: unknown }).details === "string";
}

/** Longest status message sent: a status is one HTTP/2 trailer, and one past the peer's header limit never arrives. */
export const MAX_DETAILS_CHARS = 2048;

const bounded = (s: StatusObject): StatusObject =>
  s.details.length <= MAX_DETAILS_CHARS ? s : { ...s, details: `${s.details.slice(0, MAX_DETAILS_CHARS)}... (${s.details.length} characters)` };

/** The status to send for `err` (its message bounded); logs what is not a ServiceError. */
export function toStatus(err: unknown, log: Logger, method: string, signal?: AbortSignal): StatusObject {
  return bounded(statusOf(err, log, method, signal));
}

function statusOf(err: unknown, log: Logger, method: string, signal?: AbortSignal): StatusObject {
  if (signal?.aborted) {
    const reason = signal.reason;
    // The caller is gone or past its deadline, so it gets that status; an error of the service's
    // own that came meanwhile (not the abort itself, nor a status meant for the caller) is still logged.
    // (Node's own errors, with a string code such as ERR_STREAM_DESTROYED, are the cancellation's consequences.)
    const consequence = err === reason || err instanceof ServiceError || isGrpcClientError(err) || (err instanceof Error && (err.name === "AbortError" || typeof (err as { code?: unknown }).code === "string"));
    if (!consequence) {
      log.error({ err: err instanceof Error ? err : new Error(String(err)), method }, "internal error after the call was cancelled");
    }
    if (reason instanceof ServiceError) return { code: reason.code, details: reason.message, metadata: new Metadata() };
    return { code: status.CANCELLED, details: "call cancelled", metadata: new Metadata() };
  }
  if (err instanceof ServiceError) return { code: err.code, details: err.message, metadata: trailersOf(err) };
  if (isGrpcClientError(err) && passThrough.has(err.code)) {
    return { code: err.code, details: err.details, metadata: new Metadata() };
  }
  const e = err instanceof Error ? err : new Error(String(err));
  // The CUDA engine commits a session's host memory itself as its context grows (caller_commits):
  // a full /dev/shm is then its error, a shortage of a resource, not a fault of the service.
  if (/\/dev\/shm is full/.test(e.message)) {
    log.warn({ err: e.message, method }, "shared memory is full");
    return { code: status.RESOURCE_EXHAUSTED, details: e.message, metadata: new Metadata() };
  }
  log.error({ err: e, method }, "internal error");
  return { code: status.INTERNAL, details: `internal error: ${e.message}`, metadata: new Metadata() };
}
