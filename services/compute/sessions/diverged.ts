/**
 * Diverged sessions: those a failed engine.decode may have appended a token to (the Attention
 * stream's batcher marks them, services/compute/attention/batcher.ts). Their per-layer token
 * counts here may no longer agree with the engine's, and the caller cannot know whether the token
 * is in the context, so every later call on such a session fails with the DATA_LOSS error kept
 * here (decode and prefill on the Attention stream, Generate, a move or the drain's hand-off,
 * SessionManager.checkLost) until it is closed; GetSession reports it (Session.data_loss). The
 * mark lives with the session object: a closed session takes it with it.
 */
import { status } from "@grpc/grpc-js";
import { quoteId, ServiceError } from "../../common/errors.js";
import type { ComputeSession } from "./session.js";

/** Sessions a failed call may have appended to: why their later calls fail. */
const diverged = new WeakMap<ComputeSession, ServiceError>();

/** The error of a session that a failed decode left with layer counts the engine may not share, if it is one. */
export function divergedError(s: ComputeSession): ServiceError | undefined {
  return diverged.get(s);
}

/** Throws when a failed decode left the session's layer counts unknown. */
export function checkDiverged(s: ComputeSession): void {
  const e = diverged.get(s);
  if (e) throw e;
}

/**
 * Marks `s` diverged: a decode of `layer` failed in the engine (`cause`) after it may have
 * appended the token. Returns the DATA_LOSS error its later calls get when this call marked it,
 * undefined when it was marked already (the first cause is kept).
 */
export function markDiverged(s: ComputeSession, layer: number, cause: unknown): ServiceError | undefined {
  if (diverged.has(s)) return undefined;
  const why = cause instanceof Error ? cause.message : String(cause);
  const e = new ServiceError(
    status.DATA_LOSS,
    `session ${quoteId(s.id)}: a decode of layer ${layer} failed in the engine (${why}) after it may have appended the token; the session's context is no longer known. Close it and start a new session`,
  );
  diverged.set(s, e);
  return e;
}
