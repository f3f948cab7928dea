/**
 * Diverged sessions: those a failed engine.decode may have appended a token to (the Attention
 * stream's batcher marks them, services/compute/attention/batcher.ts). Their per-layer token
 * counts here may no longer agree with the engine's, and the caller cannot know whether the token
 * is in the context, so every later call on such a session fails with the DATA_LOSS error kept
 * here (decode and prefill on the Attention stream, Generate, a move or the drain's hand-off,
 * SessionManager.checkLost) until it is closed; GetSession reports it (Session.data_loss). The
 * mark lives with the session object: a closed session takes it with it.
 *
 * The mark is also saved with the session's metadata at the kvstore (SessionMetadata.dataLoss,
 * SessionManager.saveDataLoss), so that it outlives this process: a compute that re-attaches the
 * session (a restart, after a crash or a drain that left it in place) marks it again from there
 * (restoreDiverged, through savedDataLoss), without counting it as a new divergence. The mark in
 * this process's memory is what its calls are refused by; the saved one is its copy for the next
 * process.
 */
import { status } from "@grpc/grpc-js";
import { quoteId, ServiceError } from "../../common/errors.js";
import type { ComputeSession } from "./session.js";

/** The longest DATA_LOSS message a mark carries (Session.data_loss and SessionMetadata.dataLoss hold it whole). */
export const MAX_DATA_LOSS_CHARS = 2048;

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
 * Marks `s` diverged: a decode of `layer` (the Attention stream), or `what` (a model call of
 * Generate: "a decode step", "a prompt chunk"), failed in the engine (`cause`) after it may have
 * appended the token (or the chunk's tokens). Returns the DATA_LOSS error its later calls get when
 * this call marked it, undefined when it was marked already (the first cause is kept).
 */
export function markDiverged(s: ComputeSession, layer: number | string, cause: unknown): ServiceError | undefined {
  if (diverged.has(s)) return undefined;
  let why = cause instanceof Error ? cause.message : String(cause);
  const what = typeof layer === "number" ? `a decode of layer ${layer}` : `${layer} of the model`;
  const appended = what.startsWith("a prompt chunk") ? "its tokens" : "the token";
  const message = (w: string) =>
    `session ${quoteId(s.id)}: ${what} failed in the engine (${w}) after it may have appended ${appended}; the session's context is no longer known. Close it and start a new session`;
  // The engine's message is shortened so that the whole one fits MAX_DATA_LOSS_CHARS.
  const over = message(why).length - MAX_DATA_LOSS_CHARS;
  if (over > 0) why = `${why.slice(0, Math.max(0, why.length - over - 1))}…`;
  const e = new ServiceError(status.DATA_LOSS, message(why));
  diverged.set(s, e);
  return e;
}

/**
 * Marks `s`, a session just re-attached, diverged with the DATA_LOSS `message` a previous process
 * saved with its metadata (savedDataLoss). Unlike markDiverged it reports nothing new: the
 * divergence happened in that process. Returns the error its calls get (the existing one when it
 * was marked already).
 */
export function restoreDiverged(s: ComputeSession, message: string): ServiceError {
  const had = diverged.get(s);
  if (had) return had;
  const e = new ServiceError(status.DATA_LOSS, message);
  diverged.set(s, e);
  return e;
}

/**
 * The diverged mark saved in a session's metadata (SessionMetadata.dataLoss), checked: undefined
 * when there is none (the field is absent); else the DATA_LOSS message to mark the session with.
 * A field that is present but not a non-empty string of at most MAX_DATA_LOSS_CHARS characters
 * (another type, null, empty, too long) is not used as the message: the session is still marked
 * (something recorded a data loss, and its context cannot be trusted), with a message that says
 * the saved mark was malformed, and `malformed` names why.
 */
export function savedDataLoss(id: string, metadata: { dataLoss?: unknown }): { message: string; malformed?: string } | undefined {
  const v = metadata.dataLoss;
  if (v === undefined) return undefined;
  let malformed: string | undefined;
  if (typeof v !== "string") malformed = `expected a string, got ${v === null ? "null" : Array.isArray(v) ? "an array" : typeof v}`;
  else if (v.length === 0) malformed = "it is empty";
  else if (v.length > MAX_DATA_LOSS_CHARS) malformed = `it has ${v.length} characters, more than ${MAX_DATA_LOSS_CHARS}`;
  if (malformed === undefined) return { message: v as string };
  return {
    message: `session ${quoteId(id)}: its saved data-loss mark is malformed (${malformed}); a decode may have failed after it appended a token, and the session's context is not known. Close it and start a new session`,
    malformed,
  };
}
