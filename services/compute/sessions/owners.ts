/**
 * Which pod holds a session, for deployments of several pods. A session's KV lives in one pod's
 * shared memory, so only that pod's compute can continue it; a call for it that reaches another
 * pod is answered FAILED_PRECONDITION with the owner's address in the trailing metadata
 * `x-freekv-session-owner` (the client package, packages/client, follows it; a gateway can route
 * by it). The owners are a Redis hash shared by the pods (`FREEKV_SESSION_OWNERS`, the key
 * `<prefix>owners`: session id -> the compute address other pods and clients reach it at,
 * `FREEKV_ADVERTISE_ADDRESS`). A pod claims a session when it creates, receives or re-attaches it
 * and releases it when it closes it. A create or a re-attach never takes a record that names
 * another live pod: a CreateSession for an id another live pod holds is redirected there like any
 * other call for it. Failures to record an owner are logged and counted, never fatal to the call:
 * the session still works on its own pod, only redirects to it are lost. Every command is bounded
 * by OWNERS_COMMAND_TIMEOUT_MS, so a Redis that stops answering fails like one that is down.
 */
import { Redis } from "ioredis";
// The trailing metadata key naming the pod (host:port) that holds a session: the client package's, which follows it.
import { SESSION_OWNER_KEY } from "../../../packages/client/src/index.js";
import { status } from "@grpc/grpc-js";
import { quoteId, ServiceError } from "../../common/errors.js";
import { checkTenant } from "../auth.js";
import type { Logger } from "../../common/log.js";
import type { SessionManager } from "./manager.js";
import type { ComputeSession } from "./session.js";


export { SESSION_OWNER_KEY };

/**
 * How long one command to the owners' Redis may take before it fails (ioredis commandTimeout). A
 * Redis that stops answering without closing the connection (frozen, or cut off by a network
 * partition that drops packets) would otherwise hold every call that waits for it: a create's
 * claim, a close's release, a drain's leave(). Past it the command fails like an unreachable
 * Redis: logged and counted, never fatal to the call.
 */
export const OWNERS_COMMAND_TIMEOUT_MS = 2_000;

/**
 * Lua: the address of the other live pod (its live key ARGV[3] .. address exists) the record of
 * session ARGV[1] names, else false; with ARGV[4] = "claim" and no such pod, the record is set to
 * this pod (ARGV[2]) in the same step.
 */
const LIVE_OWNER_ELSEWHERE =
  "local o = redis.call('HGET', KEYS[1], ARGV[1]) if o and o ~= ARGV[2] and redis.call('EXISTS', ARGV[3] .. o) == 1 then return o end if ARGV[4] == 'claim' then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end return false";

export class SessionOwners {
  private constructor(
    private readonly redis: Redis,
    private readonly key: string,
    readonly self: string,
    private readonly log: Logger,
    private readonly onFailure: () => void,
  ) {}

  static async connect(url: string, prefix: string, self: string, log: Logger, onFailure: () => void = () => {}): Promise<SessionOwners> {
    const redis = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 2, enableOfflineQueue: false, connectTimeout: 3000, commandTimeout: OWNERS_COMMAND_TIMEOUT_MS });
    redis.on("error", () => {}); // reported per operation below
    await redis.connect();
    return new SessionOwners(redis, `${prefix}owners`, self, log, onFailure);
  }

  /**
   * This pod holds `id` now, whoever the record named: a move's target takes the session over
   * from its source (the record names the source, live, until this write).
   */
  async claim(id: string): Promise<void> {
    try {
      await this.redis.hset(this.key, id, this.self);
    } catch (e) {
      this.onFailure();
      this.log.error({ err: e, session: id }, "could not record this pod as the session's owner: other pods will not redirect to it");
    }
  }

  /**
   * Claims `id` unless another pod that is live (its heartbeat key exists) owns it, in one step:
   * the record is set when there is none, when it names this pod, or when the pod it names is
   * gone. Returns the live owner's address when there is one, and the caller gives its copy up:
   * - at start, for a session this pod's kvstore still holds: the session moved there (this copy's
   *   release was cut short by a crash), or this pod imported it and died before it answered (the
   *   source kept it), so this copy is stale;
   * - for a session this pod has just created: two pods created the id at once, and the other
   *   one's claim came first.
   * A directory that does not answer claims nothing and says nothing (logged and counted): the
   * session is served here as without a directory.
   */
  claimUnlessLive(id: string): Promise<string | undefined> {
    return this.liveOwner(id, true, "could not record this pod as the session's owner: other pods will not redirect to it");
  }

  /**
   * The address of another pod that holds `id` and is live, as a create checks before it makes
   * a session of that id; undefined when no other live pod does, or when the directory does not
   * answer (logged and counted: the create goes on as without a directory, and claimUnlessLive
   * settles a race).
   */
  liveOwnerElsewhere(id: string): Promise<string | undefined> {
    return this.liveOwner(id, false, "could not look up the session's owner");
  }

  private async liveOwner(id: string, claim: boolean, failure: string): Promise<string | undefined> {
    try {
      const other = await this.redis.eval(LIVE_OWNER_ELSEWHERE, 1, this.key, id, this.self, this.podKey(""), claim ? "claim" : "look");
      return typeof other === "string" ? other : undefined;
    } catch (e) {
      this.onFailure();
      if (claim) this.log.error({ err: e, session: id }, failure);
      else this.log.warn({ err: e, session: id }, failure);
      return undefined;
    }
  }

  /** This pod no longer holds `id` (only if the record still names this pod). */
  async release(id: string): Promise<void> {
    try {
      await this.redis.eval("if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end return 0", 1, this.key, id, this.self);
    } catch (e) {
      this.onFailure();
      this.log.error({ err: e, session: id }, "could not remove the session's owner record");
    }
  }

  /** The address the directory records for `id` (this pod's own included); rejects when the directory does not answer. */
  async ownerOf(id: string): Promise<string | undefined> {
    try {
      return (await this.redis.hget(this.key, id)) ?? undefined;
    } catch (e) {
      this.onFailure();
      throw e;
    }
  }

  /** The address of the pod holding `id`, if another pod does. */
  async elsewhere(id: string): Promise<string | undefined> {
    try {
      const owner = await this.redis.hget(this.key, id);
      return owner && owner !== this.self ? owner : undefined;
    } catch (e) {
      this.onFailure();
      this.log.warn({ err: e, session: id }, "could not look up the session's owner");
      return undefined;
    }
  }

  // Live pods, for a drain's hand-off (FREEKV_DRAIN_HANDOFF=owners): each compute keeps a key
  // `<prefix>pod:<address>` alive (refreshed every POD_HEARTBEAT_MS, expiring after POD_TTL_MS),
  // and removes it when it starts to drain. Expiry is Redis's clock, not the pods'.
  static readonly POD_HEARTBEAT_MS = 5_000;
  static readonly POD_TTL_MS = 15_000;
  private heartbeatTimer: NodeJS.Timeout | undefined;

  private podKey(address: string): string {
    return `${this.key.slice(0, -"owners".length)}pod:${address}`;
  }

  /** Announces this pod as live now and every POD_HEARTBEAT_MS (failures are logged and counted). */
  startHeartbeat(): void {
    const beat = () =>
      this.redis.set(this.podKey(this.self), String(process.pid), "PX", SessionOwners.POD_TTL_MS).catch((e: Error) => {
        this.onFailure();
        this.log.warn({ err: e.message }, "could not announce this pod as live: drains of other pods will not hand sessions to it");
      });
    void beat();
    this.heartbeatTimer ??= setInterval(beat, SessionOwners.POD_HEARTBEAT_MS);
    this.heartbeatTimer.unref();
  }

  /**
   * This pod takes no sessions any more (it drains): its live key goes now, not at its expiry. A
   * Redis that does not answer fails it within OWNERS_COMMAND_TIMEOUT_MS (logged and counted), so
   * the drain goes on; the key then expires by itself after POD_TTL_MS.
   */
  async leave(): Promise<void> {
    if (this.heartbeatTimer) clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = undefined;
    await this.redis.del(this.podKey(this.self)).catch((e: Error) => {
      this.onFailure();
      this.log.warn({ err: e.message }, "could not remove this pod's live key");
    });
  }

  /** The other pods announced live (their addresses, sorted); [] when the directory does not answer. */
  async livePeers(): Promise<string[]> {
    const prefix = this.podKey("");
    const found = new Set<string>();
    try {
      let cursor = "0";
      do {
        const [next, keys] = await this.redis.scan(cursor, "MATCH", `${prefix.replace(/[*?[\]\\]/g, "\\$&")}*`, "COUNT", 1000);
        cursor = next;
        for (const k of keys) found.add(k.slice(prefix.length));
      } while (cursor !== "0");
    } catch (e) {
      this.onFailure();
      this.log.error({ err: (e as Error).message }, "could not list the live pods for the hand-off");
      return [];
    }
    found.delete(this.self);
    return [...found].sort();
  }

  async close(): Promise<void> {
    if (this.heartbeatTimer) clearInterval(this.heartbeatTimer);
    this.redis.disconnect();
  }
}

/** FAILED_PRECONDITION naming the pod that holds the session, with its address in the trailers. */
export function heldElsewhere(id: string, owner: string): ServiceError {
  return new ServiceError(status.FAILED_PRECONDITION, `session ${quoteId(id)} is held by the pod at ${owner}; send the call there (trailer ${SESSION_OWNER_KEY})`, {
    [SESSION_OWNER_KEY]: owner,
  });
}

/**
 * The session `id` if this pod holds it (and, with authentication on, it is `tenant`'s);
 * FAILED_PRECONDITION with the owner's address if another pod does (per the owners), NOT_FOUND
 * otherwise, PERMISSION_DENIED if it is another tenant's.
 */
export async function localSession(sessions: SessionManager, owners: SessionOwners | undefined, id: string, tenant?: string): Promise<ComputeSession> {
  if (!sessions.has(id) && owners) {
    const owner = await owners.elsewhere(id);
    if (owner) throw heldElsewhere(id, owner);
  }
  // Without a directory answer, a session this pod moved away is redirected to where it went (sessions.get).
  const s = sessions.get(id);
  // With tenant authentication on (tenant defined), a session is its creator's only.
  checkTenant(s.metadata.tenant, tenant, id);
  return s;
}
