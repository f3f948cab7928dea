/**
 * Stream plumbing shared by the services' streaming handlers and the session moves: a server
 * stream's write that waits for 'drain' (backpressure) for a bounded time, a client stream's write that also stops
 * when the call failed, and reading a server-side client stream message by message against the
 * call's AbortSignal.
 */
import { status, type ClientWritableStream, type ServerReadableStream } from "@grpc/grpc-js";
import { MAX_TIMER_MS, raceAbort, whenAborted } from "./cancellation.js";
import { ServiceError } from "./errors.js";

/** What `send` needs of a server stream (a grpc-js server or duplex stream, or the in-process Generate call). */
export interface WritableCall<T> {
  write(msg: T): boolean;
  on(event: "drain", listener: () => void): unknown;
  removeListener(event: "drain", listener: () => void): unknown;
}

/**
 * The error of a client that read nothing for `stallMs` while the transport was full. DEADLINE_EXCEEDED: the
 * call ran past a time limit of the server's; a client that reads again sees it after the messages it had not read.
 */
export class WriteStalled extends ServiceError {
  constructor(readonly stallMs: number) {
    super(status.DEADLINE_EXCEEDED, `the client read nothing for ${stallMs} ms while the call's stream was full (FREEKV_WRITE_STALL_MS): the call was ended to free what it held`);
  }
}

/**
 * Writes one message of a server stream, waiting for 'drain' when the transport is full. A client
 * that stays connected but stops reading would otherwise hold the call (its running slot, its
 * session's lock) for as long as it stays: after `stallMs` without a drain (0: no limit) the write
 * fails with `WriteStalled`, and the handler's error path frees what the call held.
 */
export async function send<T>(call: WritableCall<T>, msg: T, signal: AbortSignal, stallMs = 0): Promise<void> {
  if (signal.aborted) throw signal.reason;
  if (call.write(msg)) return;
  let timer: NodeJS.Timeout | undefined;
  let stalled = false;
  await new Promise<void>((resolve) => {
    const done = () => {
      call.removeListener("drain", done);
      signal.removeEventListener("abort", done);
      clearTimeout(timer);
      resolve();
    };
    call.on("drain", done);
    signal.addEventListener("abort", done, { once: true });
    if (stallMs > 0)
      timer = setTimeout(
        () => {
          stalled = true;
          done();
        },
        Math.min(stallMs, MAX_TIMER_MS),
      );
  });
  if (signal.aborted) throw signal.reason;
  if (stalled) throw new WriteStalled(stallMs);
}

/**
 * Writes one message of a client stream; when the transport is full, waits for 'drain', the
 * call's answer (`done`: a failed call rejects with its status) or the signal, whichever first.
 */
export async function sendUpstream<T>(stream: ClientWritableStream<T>, msg: T, done: Promise<unknown>, signal?: AbortSignal): Promise<void> {
  if (signal?.aborted) throw signal.reason;
  if (stream.write(msg)) return;
  let onDrain: (() => void) | undefined;
  const drained = new Promise<void>((resolve) => {
    onDrain = resolve;
    stream.once("drain", onDrain);
  });
  try {
    const either = Promise.race([drained, done.then(() => undefined)]);
    await (signal ? raceAbort(either, signal) : either);
  } finally {
    stream.removeListener("drain", onDrain!);
  }
  if (signal?.aborted) throw signal.reason;
}

/**
 * Takes every message of a client stream through `each`, in order, racing the call's signal
 * (cancel, deadline, drain). `idleMs` > 0 (FREEKV_WRITE_STALL_MS): a client that sends nothing for
 * that long while the stream is open ends the call with DEADLINE_EXCEEDED, so that a peer without a
 * deadline cannot hold what its stream reserved until its connection drops; the time `each` takes
 * (this side's own waits) does not count.
 */
export async function consume<T>(call: ServerReadableStream<T, unknown>, signal: AbortSignal, each: (m: T) => Promise<void> | void, idleMs = 0): Promise<void> {
  const it = (call as unknown as AsyncIterable<T>)[Symbol.asyncIterator]();
  const aborted = whenAborted(signal);
  aborted.catch(() => {});
  const ms = Math.min(idleMs, MAX_TIMER_MS);
  for (;;) {
    let timer: NodeJS.Timeout | undefined;
    const idle =
      ms > 0
        ? new Promise<never>((_, reject) => {
            timer = setTimeout(() => reject(new ServiceError(status.DEADLINE_EXCEEDED, `the client sent nothing for ${ms} ms in the middle of its stream (FREEKV_WRITE_STALL_MS)`)), ms);
          })
        : undefined;
    let r: IteratorResult<T>;
    try {
      r = await Promise.race(idle ? [it.next(), aborted, idle] : [it.next(), aborted]);
    } finally {
      clearTimeout(timer);
    }
    if (r.done) return;
    await each(r.value);
    if (signal.aborted) throw signal.reason;
  }
}
