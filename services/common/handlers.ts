/**
 * Adapters from async functions to grpc-js handlers: every call gets an AbortSignal (cancel and
 * deadline), and every failure goes through toStatus, so no handler formats a status itself.
 */
import type { handleUnaryCall, ServerUnaryCall, sendUnaryData } from "@grpc/grpc-js";
import { callScope } from "./cancellation.js";
import { toStatus } from "./errors.js";
import type { Logger } from "./log.js";

export function unary<Req, Res>(log: Logger, method: string, fn: (req: Req, signal: AbortSignal, call: ServerUnaryCall<Req, Res>) => Promise<Res>): handleUnaryCall<Req, Res> {
  return (call: ServerUnaryCall<Req, Res>, callback: sendUnaryData<Res>) => {
    const scope = callScope(call);
    // A handler that throws before its first await fails the call like one that rejects.
    Promise.resolve()
      .then(() => fn(call.request, scope.signal, call))
      .then(
        (res) => {
          if (scope.signal.aborted) callback(toStatus(undefined, log, method, scope.signal));
          else callback(null, res);
        },
        (err: unknown) => callback(toStatus(err, log, method, scope.signal)),
      )
      .finally(() => scope.done());
  };
}
