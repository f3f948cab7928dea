/**
 * The drain's hand-off: a compute that stops (SIGTERM) with FREEKV_DRAIN_HANDOFF set moves every
 * named session it holds to one of the computes named there before it exits, instead of leaving
 * them in a kvstore that is about to go away with the pod. It runs after the in-flight calls
 * ended (the drain's grace period), so the sessions are idle, one at a time (each move holds the
 * session's lock and streams its pages; a pod's network and kvstore are the bottleneck either
 * way), within FREEKV_DRAIN_HANDOFF_TIMEOUT_MS in all. The peers are the setting's list, or with
 * "owners" the pods that announce themselves live in the session-owners directory
 * (SessionOwners.livePeers; this pod withdraws its own announcement when it starts to drain). Sessions are spread over the peers in turn;
 * a peer that refuses one (draining too, full, unreachable) is skipped for the next in the list.
 * A session that could not be moved stays in this pod's kvstore, as without a hand-off: it is
 * logged, one line per session with the reason, and counted (freekv_compute_handoff_failures_total).
 * A lost or diverged session (diverged.ts) is not offered to any peer.
 */
import type { ComputeContext } from "../context.js";
import { divergedError } from "./diverged.js";
import { moveOutcomeUnknown, type SessionMover } from "./move.js";

/** The peers of a FREEKV_DRAIN_HANDOFF list, without this pod's own address ("owners": found at the drain instead). */
export function handoffPeers(setting: string | undefined, self: string | undefined): string[] {
  if (!setting || setting === "owners") return [];
  const peers = setting
    .split(",")
    .map((p) => p.trim())
    .filter((p) => p && p !== self);
  return [...new Set(peers)];
}

export async function handOffSessions(ctx: ComputeContext, mover: SessionMover, peers: string[], timeoutMs: number): Promise<{ moved: number; failed: number }> {
  const deadline = Date.now() + timeoutMs;
  const sessions = ctx.sessions.list().filter((s) => !s.unnamed && !s.closed);
  let moved = 0;
  let failed = 0;
  let next = 0;
  if (sessions.length) ctx.log.info({ sessions: sessions.length, peers }, "handing sessions off to other pods before exiting");
  for (const s of sessions) {
    const reasons: string[] = [];
    let done = false;
    // A session whose context is unknown (a failed decode may have appended to it) is not carried
    // to another pod: the move would refuse it with DATA_LOSS at every peer.
    const diverged = divergedError(s);
    if (s.lost) reasons.push("the session is lost (its kvstore no longer held it)");
    else if (diverged) reasons.push(diverged.message);
    for (let i = 0; !s.lost && !diverged && i < peers.length && !done; i++) {
      if (Date.now() >= deadline) {
        reasons.push(`FREEKV_DRAIN_HANDOFF_TIMEOUT_MS=${timeoutMs} ran out`);
        break;
      }
      const peer = peers[(next + i) % peers.length];
      try {
        await mover.move(s, peer, { deadline, drain: true });
        moved++;
        next = (next + i + 1) % peers.length;
        done = true;
      } catch (e) {
        reasons.push(`${peer}: ${(e as Error).message}`);
        // Nobody could tell whether that peer took it: offered to another, it could be held twice.
        if (moveOutcomeUnknown(e)) {
          reasons.push(`not offered to another peer: ${peer} may hold it`);
          break;
        }
      }
    }
    if (!done) {
      failed++;
      mover.metrics.handoffFailures.inc();
      ctx.log.error({ session: s.id, contextTokens: s.contextTokens, reason: reasons.join("; ") || "no peer to hand it to" }, "session not handed off: it stays in this pod's kvstore");
    }
  }
  if (sessions.length) ctx.log.info({ moved, failed }, "hand-off done");
  return { moved, failed };
}
