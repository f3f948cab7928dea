/**
 * A Generate call made in process: the OpenAI front hands its request to the very handler the
 * gRPC server serves (services/compute/generate/handler.ts), through an object with the surface
 * of a grpc-js server stream. The handler's writes come back as messages (with its backpressure:
 * a write that returns false waits for `drained()`), its end or error status settle `done`, and
 * `cancel()` is the client going away: the handler's call scope turns it into the AbortSignal
 * that stops the generation, exactly as for a cancelled gRPC call. A deadline is the call's
 * deadline (DEADLINE_EXCEEDED when it passes).
 */
import { EventEmitter } from "node:events";
import { Metadata, type handleServerStreamingCall, type ServerWritableStream, type StatusObject } from "@grpc/grpc-js";
import type { GenerateRequest, GenerateResponse } from "../../../proto/gen/freekv/v1/compute.js";

export type GenerateHandler = handleServerStreamingCall<GenerateRequest, GenerateResponse>;

export interface CallOptions {
  /** Absolute deadline (ms since the epoch); none when undefined. */
  deadline?: number;
  /** Request metadata the handler reads (e.g. a tenant header), as gRPC metadata. */
  metadata?: Record<string, string>;
  /** Each message the handler writes; false: hold the next write until drained() is called. */
  onMessage(msg: GenerateResponse): boolean;
}

export interface InProcessCall {
  /** Resolves when the handler ended the call; rejects with the status it sent otherwise. */
  readonly done: Promise<void>;
  /** The client went away: the call is cancelled (CANCELLED in the handler). */
  cancel(): void;
  /** The consumer can take messages again after onMessage returned false. */
  drained(): void;
}

/** The part of a grpc-js server stream the handler (and its call scope) uses. */
class CallSurface extends EventEmitter {
  cancelled = false;
  readonly metadata = new Metadata();

  constructor(
    readonly request: GenerateRequest,
    private readonly deadline: number,
    private readonly onMessage: (msg: GenerateResponse) => boolean,
    private readonly onEnd: () => void,
  ) {
    super();
  }

  getDeadline(): number {
    return this.deadline;
  }

  getPeer(): string {
    return "in-process";
  }

  getPath(): string {
    return "/freekv.v1.ComputeService/Generate";
  }

  sendMetadata(): void {}

  write(msg: GenerateResponse): boolean {
    return this.onMessage(msg);
  }

  end(): void {
    this.onEnd();
  }
}

export function startGenerate(handler: GenerateHandler, request: GenerateRequest, opts: CallOptions): InProcessCall {
  let resolve!: () => void;
  let reject!: (st: StatusObject) => void;
  const done = new Promise<void>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  done.catch(() => {}); // the consumer awaits it; never an unhandled rejection meanwhile
  const call = new CallSurface(request, opts.deadline ?? Infinity, opts.onMessage, () => resolve());
  for (const [k, v] of Object.entries(opts.metadata ?? {})) call.metadata.set(k, v);
  // The handler reports a failure by emitting "error" with the status, as on a gRPC stream.
  call.on("error", (st: StatusObject) => reject(st));
  handler(call as unknown as ServerWritableStream<GenerateRequest, GenerateResponse>);
  return {
    done,
    cancel() {
      if (call.cancelled) return;
      call.cancelled = true;
      call.emit("cancelled");
    },
    drained() {
      call.emit("drain");
    },
  };
}
