/**
 * A call's cancellation and deadline as an AbortSignal, so handler code (and the engine calls
 * under it) can stop waiting as soon as the client is gone. The signals of calls in flight are
 * kept in one set so the drain can abort them all at the end of its grace period.
 */
import { status } from "@grpc/grpc-js";

/** What every server call (unary or stream) has; grpc-js does not export this type from its root. */
export interface ServerSurfaceCall {
  readonly cancelled: boolean;
  on(event: "cancelled", listener: () => void): unknown;
  removeListener(event: "cancelled", listener: () => void): unknown;
  getDeadline(): Date | number;
}
import { ServiceError } from "./errors.js";

const inflight = new Set<AbortController>();

export function inflightCalls(): number {
  return inflight.size;
}

/** Aborts every call in flight (drain grace period over). */
export function abortAllCalls(reason = "server shutting down"): void {
  for (const ac of inflight) ac.abort(new ServiceError(status.UNAVAILABLE, reason));
}

export interface CallScope {
  signal: AbortSignal;
  /** Stops tracking the call (always call when the handler is done). */
  done(): void;
}

/** The longest delay setTimeout takes as given. */
export const MAX_TIMER_MS = 2 ** 31 - 1;

export function callScope(call: ServerSurfaceCall): CallScope {
  const ac = new AbortController();
  inflight.add(ac);
  const onCancel = () => ac.abort(new ServiceError(status.CANCELLED, "call cancelled by the client"));
  call.on("cancelled", onCancel);
  let timer: NodeJS.Timeout | undefined;
  const deadline = call.getDeadline();
  const ms = deadline instanceof Date ? deadline.getTime() - Date.now() : typeof deadline === "number" && Number.isFinite(deadline) ? deadline - Date.now() : Infinity;
  if (Number.isFinite(ms)) {
    // setTimeout fires at once for a delay above 2^31 - 1 ms (~24.8 days): a longer deadline is
    // waited for in pieces.
    const at = Date.now() + ms;
    const arm = () => {
      const left = at - Date.now();
      timer = left > MAX_TIMER_MS ? setTimeout(arm, MAX_TIMER_MS) : setTimeout(() => ac.abort(new ServiceError(status.DEADLINE_EXCEEDED, "deadline exceeded")), Math.max(0, left));
      timer.unref();
    };
    arm();
  }
  return {
    signal: ac.signal,
    done() {
      inflight.delete(ac);
      call.removeListener("cancelled", onCancel);
      if (timer) clearTimeout(timer);
    },
  };
}

/**
 * Rejects with the signal's reason once it aborts. Its listener stays until then: for one wait
 * per call (a stream's whole life); a wait repeated per message takes raceAbort.
 */
export function whenAborted(signal: AbortSignal): Promise<never> {
  return new Promise((_, reject) => {
    if (signal.aborted) reject(signal.reason);
    else signal.addEventListener("abort", () => reject(signal.reason), { once: true });
  });
}

/**
 * `p`, or the signal's reason if it aborts first. The abort listener goes when `p` settles, so a
 * long stream that races every message's wait against its call's signal does not pile them up.
 */
export function raceAbort<T>(p: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) {
    p.catch(() => {});
    return Promise.reject(signal.reason);
  }
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    p.then(
      (v) => {
        signal.removeEventListener("abort", onAbort);
        resolve(v);
      },
      (e: unknown) => {
        signal.removeEventListener("abort", onAbort);
        reject(e);
      },
    );
  });
}
