/**
 * Stream plumbing shared by the services' streaming handlers and the session moves: a server
 * stream's write that waits for 'drain' (backpressure), a client stream's write that also stops
 * when the call failed, and reading a server-side client stream message by message against the
 * call's AbortSignal.
 */
import type { ClientWritableStream, ServerReadableStream, ServerWritableStream } from "@grpc/grpc-js";
import { raceAbort, whenAborted } from "./cancellation.js";

/** Writes one message of a server stream, waiting for 'drain' when the transport is full. */
export async function send<T>(call: ServerWritableStream<unknown, T>, msg: T, signal: AbortSignal): Promise<void> {
  if (signal.aborted) throw signal.reason;
  if (call.write(msg)) return;
  await new Promise<void>((resolve) => {
    const done = () => {
      call.removeListener("drain", done);
      signal.removeEventListener("abort", done);
      resolve();
    };
    call.on("drain", done);
    signal.addEventListener("abort", done, { once: true });
  });
  if (signal.aborted) throw signal.reason;
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

/** Takes every message of a client stream through `each`, in order, racing the call's signal (cancel, deadline, drain). */
export async function consume<T>(call: ServerReadableStream<T, unknown>, signal: AbortSignal, each: (m: T) => Promise<void> | void): Promise<void> {
  const it = (call as unknown as AsyncIterable<T>)[Symbol.asyncIterator]();
  const aborted = whenAborted(signal);
  aborted.catch(() => {});
  for (;;) {
    const r = await Promise.race([it.next(), aborted]);
    if (r.done) return;
    await each(r.value);
    if (signal.aborted) throw signal.reason;
  }
}
