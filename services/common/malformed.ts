/**
 * Requests that do not decode get INVALID_ARGUMENT, not INTERNAL: grpc-js answers a throwing
 * requestDeserialize with INTERNAL "Error deserializing request" before any handler or interceptor
 * sees the call, so the service definition's decoder of each single-message method is wrapped to
 * return a marker instead, and the method's handler answers the marker with INVALID_ARGUMENT.
 * Client-streaming methods' messages reach the handler one by one: their decoder returns the
 * marker too, and the handler checks each message with assertDecoded.
 *
 * A single-message request larger than `maxRequestBytes` is not decoded at all: the generated
 * decoder expands packed repeated fields into JavaScript arrays before any handler or check runs,
 * and a message near the transport's limit (256 MiB) of packed token ids aborts the process with an
 * uncatchable heap error. Such a request gets RESOURCE_EXHAUSTED (gRPC's code for a message over a
 * size limit), naming both sizes. Every request, streamed messages included, is also counted on
 * its wire bytes before it is decoded (wire-budget.ts): more embedded messages or repeated values
 * than the limits (`wireLimits`) is RESOURCE_EXHAUSTED too, since a stream's messages may be as
 * large as the transport allows and a few bytes each decode into an object.
 */
import { ServiceError } from "./errors.js";
import { overBudget, requestMessage, type WireLimits } from "./wire-budget.js";
import { Metadata, status, type ServiceDefinition, type StatusObject, type UntypedServiceImplementation } from "@grpc/grpc-js";

const MALFORMED = Symbol("malformed request");

type Marker = { [MALFORMED]: string; code?: status };

const isMalformed = (req: unknown): req is Marker => typeof req === "object" && req !== null && MALFORMED in req;

const statusOf = (m: Marker): StatusObject => ({
  code: m.code ?? status.INVALID_ARGUMENT,
  details: m.code === undefined ? `request: cannot be decoded as the method's message: ${m[MALFORMED].slice(0, 256)}` : m[MALFORMED],
  metadata: new Metadata(),
});

export interface RejectOptions {
  /** Largest single-message request decoded, bytes (default: none beyond the transport's limit). */
  maxRequestBytes?: number;
  /** Most embedded messages and repeated values a request (or streamed message) decodes into (default DEFAULT_WIRE_LIMITS). */
  wireLimits?: WireLimits;
}

/**
 * Room for every request the services take (a decode batch of thousands of sessions is a few
 * values each; a prompt's token ids are bounded by the byte limit of their method first), far
 * below what would strain the heap: a million small objects is a few hundred MiB at worst.
 */
export const DEFAULT_WIRE_LIMITS: WireLimits = { maxMessages: 1 << 16, maxValues: 1 << 24 };

/** The definition and implementation to register: malformed single-message requests become INVALID_ARGUMENT. */
export function rejectMalformed<D extends ServiceDefinition, I extends UntypedServiceImplementation>(def: D, impl: I, opts: RejectOptions = {}): { definition: D; implementation: I } {
  const max = opts.maxRequestBytes ?? Infinity;
  const limits = opts.wireLimits ?? DEFAULT_WIRE_LIMITS;
  const definition: Record<string, unknown> = {};
  const implementation: Record<string, unknown> = { ...impl };
  for (const [name, m] of Object.entries(def)) {
    const desc = requestMessage(m.path);
    const counted = (b: Buffer): Marker | undefined => {
      const over = desc && overBudget(desc, b, limits);
      return over ? { [MALFORMED]: `request: ${over}, over ${name}'s limit`, code: status.RESOURCE_EXHAUSTED } : undefined;
    };
    if (m.requestStream) {
      definition[name] = {
        ...m,
        requestDeserialize: (b: Buffer) => {
          const over = counted(b);
          if (over) return over;
          try {
            return m.requestDeserialize(b);
          } catch (e) {
            return { [MALFORMED]: (e as Error).message } satisfies Marker;
          }
        },
      };
      continue;
    }
    definition[name] = {
      ...m,
      requestDeserialize: (b: Buffer) => {
        if (b.length > max)
          return { [MALFORMED]: `request: ${b.length} bytes, over ${name}'s limit of ${max} bytes`, code: status.RESOURCE_EXHAUSTED } satisfies Marker;
        const over = counted(b);
        if (over) return over;
        try {
          return m.requestDeserialize(b);
        } catch (e) {
          return { [MALFORMED]: (e as Error).message } satisfies Marker;
        }
      },
    };
    const h = impl[name] as ((call: { request: unknown; emit(e: string, s: StatusObject): void }, cb?: (e: StatusObject) => void) => void) | undefined;
    if (!h) continue;
    implementation[name] = m.responseStream
      ? (call: { request: unknown; emit(e: string, s: StatusObject): boolean }) => (isMalformed(call.request) ? call.emit("error", statusOf(call.request)) : h(call))
      : (call: { request: unknown; emit(e: string, s: StatusObject): boolean }, cb: (e: StatusObject) => void) => (isMalformed(call.request) ? cb(statusOf(call.request)) : h(call, cb));
  }
  return { definition: definition as D, implementation: implementation as I };
}

/** A streamed message that did not decode: INVALID_ARGUMENT (the stream's handler calls this on each message). */
export function assertDecoded(req: unknown): void {
  if (isMalformed(req)) {
    const s = statusOf(req);
    throw new ServiceError(s.code, s.details);
  }
}
