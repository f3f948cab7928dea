/**
 * The session directory: what the kvstore knows about each session (geometry, retrieval, max
 * context, opaque metadata, segment names, committed pages). In memory by default; in Redis
 * (FREEKV_DIRECTORY=redis://...) so that a restarted kvstore finds the segments it kept.
 */
import { Redis } from "ioredis";
import { ModelGeometry, RetrievalConfig, type SegmentRef } from "../../proto/gen/freekv/v1/common.js";

export interface SessionRecord {
  sessionId: string;
  geometry: ModelGeometry;
  retrieval: RetrievalConfig;
  maxContextTokens: number;
  capacityPages: number;
  metadata: Buffer;
  segments: { store: SegmentRef; staging: SegmentRef; tail: SegmentRef; manifest: SegmentRef };
  /** Committed full pages per layer. */
  committedPages: number[];
  contextTokens: number;
  createdAt: string;
  /**
   * Context tokens the store has memory for (ReserveContext); the allocation stays with the
   * segments, so a kvstore that adopts them counts it again. Absent in records of kvstores
   * before reservations: the whole store (maxContextTokens).
   */
  reservedTokens?: number;
}

export interface SessionDirectory {
  readonly kind: "memory" | "redis";
  /** The record of `id`; rejects with UnreadableRecordError when one is stored that cannot be decoded. */
  get(id: string): Promise<SessionRecord | undefined>;
  put(rec: SessionRecord): Promise<void>;
  delete(id: string): Promise<void>;
  /** Takes an unreadable record of `id` out of the directory (see RedisDirectory.setAside). */
  setAside(id: string): Promise<void>;
  list(): Promise<string[]>;
  /** Resolves while the directory answers. */
  ping(): Promise<void>;
  close(): Promise<void>;
}

export class MemoryDirectory implements SessionDirectory {
  readonly kind = "memory" as const;
  private readonly map = new Map<string, SessionRecord>();
  async get(id: string) {
    const r = this.map.get(id);
    return r && structuredClone(r);
  }
  async put(rec: SessionRecord) {
    this.map.set(rec.sessionId, structuredClone(rec));
  }
  async delete(id: string) {
    this.map.delete(id);
  }
  async setAside(id: string) {
    this.map.delete(id);
  }
  async list() {
    return [...this.map.keys()].sort();
  }
  async ping() {}
  async close() {}
}

function encode(rec: SessionRecord): string {
  return JSON.stringify({
    ...rec,
    geometry: ModelGeometry.toJSON(rec.geometry),
    retrieval: RetrievalConfig.toJSON(rec.retrieval),
    metadata: rec.metadata.toString("base64"),
  });
}

/** A stored record that cannot be decoded (not JSON, or a field missing or of the wrong type). */
export class UnreadableRecordError extends Error {
  constructor(
    readonly sessionId: string,
    why: string,
  ) {
    super(`the directory record of session ${JSON.stringify(sessionId)} cannot be read: ${why}`);
    this.name = "UnreadableRecordError";
  }
}

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === "object" && v !== null && !Array.isArray(v);
/** What a segment name in a record must look like (the native module's rule for shm_open names). */
const SEGMENT_NAME_RE = /^\/[^/\0]{1,249}$/;
const isCount = (v: unknown): v is number => typeof v === "number" && Number.isSafeInteger(v) && v >= 0;

/**
 * The record stored for `id`, checked field by field before anything uses it (an adoption maps
 * the segments it names and counts the bytes it gives): UnreadableRecordError saying what is wrong.
 */
function decode(id: string, s: string): SessionRecord {
  let o: unknown;
  try {
    o = JSON.parse(s);
  } catch (e) {
    throw new UnreadableRecordError(id, `not JSON (${(e as Error).message})`);
  }
  const bad = (why: string) => new UnreadableRecordError(id, why);
  if (!isObject(o)) throw bad("not a JSON object");
  if (o.sessionId !== id) throw bad(`its sessionId is ${JSON.stringify(o.sessionId)}`);
  if (!isObject(o.geometry)) throw bad("geometry is missing");
  if (!isObject(o.retrieval)) throw bad("retrieval is missing");
  for (const f of ["maxContextTokens", "capacityPages", "contextTokens"] as const) if (!isCount(o[f])) throw bad(`${f} is not a count`);
  if (o.reservedTokens !== undefined && !isCount(o.reservedTokens)) throw bad("reservedTokens is not a count");
  if (!Array.isArray(o.committedPages) || !o.committedPages.every(isCount)) throw bad("committedPages is not a list of counts");
  if (o.metadata !== undefined && typeof o.metadata !== "string") throw bad("metadata is not base64 text");
  const segs = o.segments;
  if (!isObject(segs)) throw bad("segments is missing");
  for (const k of ["store", "staging", "tail", "manifest"] as const) {
    const r = segs[k];
    if (!isObject(r) || typeof r.name !== "string" || !r.name || !isCount(r.sizeBytes)) throw bad(`segments.${k} is not a segment (name, sizeBytes)`);
    // The shared-memory name rule (native/src/shm: '/name', no other slash, at most 250 characters):
    // a record holding another name could neither be opened nor unlinked.
    if (!SEGMENT_NAME_RE.test(r.name)) throw bad(`segments.${k}.name ${JSON.stringify(r.name.slice(0, 80))} is not a shared-memory segment name`);
  }
  try {
    return {
      ...(o as unknown as SessionRecord),
      geometry: ModelGeometry.fromJSON(o.geometry),
      retrieval: RetrievalConfig.fromJSON(o.retrieval),
      metadata: Buffer.from(String(o.metadata ?? ""), "base64"),
    };
  } catch (e) {
    throw bad((e as Error).message);
  }
}

/** A MULTI's result: null when it was discarded, or per-command errors; either fails the write. */
function failed(res: [Error | null, unknown][] | null): void {
  if (res === null) throw new Error("the transaction was discarded");
  for (const [e] of res) if (e) throw e;
}

/**
 * How long one command to the directory's Redis may take before it fails (ioredis
 * commandTimeout). A Redis that stops answering without closing the connection (frozen, or cut
 * off by a partition that drops packets) would otherwise hold every call that writes the directory
 * and the shutdown; past it the operation fails as with an unreachable Redis (UNAVAILABLE, counted,
 * the kvstore NOT_SERVING until the directory answers: directory-health.ts).
 */
export const DIRECTORY_COMMAND_TIMEOUT_MS = 2_000;

/**
 * Sessions as JSON strings under `<prefix>session:<id>`, ids in the set `<prefix>sessions`;
 * records set aside as unreadable under `<prefix>quarantine:<id>`.
 */
export class RedisDirectory implements SessionDirectory {
  readonly kind = "redis" as const;
  private constructor(
    private readonly redis: Redis,
    private readonly prefix: string,
  ) {}

  static async connect(url: string, prefix: string): Promise<RedisDirectory> {
    const redis = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 2, enableOfflineQueue: false, connectTimeout: 3000, commandTimeout: DIRECTORY_COMMAND_TIMEOUT_MS });
    redis.on("error", () => {
      /* surfaced through the failing command */
    });
    await redis.connect();
    await redis.ping();
    return new RedisDirectory(redis, prefix);
  }

  private key(id: string) {
    return `${this.prefix}session:${id}`;
  }
  async get(id: string) {
    const s = await this.redis.get(this.key(id));
    return s === null ? undefined : decode(id, s);
  }
  /**
   * An unreadable record is moved, as it is, to `<prefix>quarantine:<id>` (replacing one set aside
   * before) and its id taken out of `<prefix>sessions`, in one step: it is never listed or adopted
   * again, and nothing that could tell what went wrong is lost (an operator reads the key, then
   * deletes it). It is not deleted: the segments it names cannot be known without decoding it, so
   * they are left to the sweep of a later start (segments.ts), which removes those no record names.
   */
  async setAside(id: string) {
    await this.redis.eval(
      "if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('RENAME', KEYS[1], KEYS[2]) end redis.call('SREM', KEYS[3], ARGV[1]) return 1",
      3,
      this.key(id),
      `${this.prefix}quarantine:${id}`,
      `${this.prefix}sessions`,
      id,
    );
  }
  async put(rec: SessionRecord) {
    failed(await this.redis.multi().set(this.key(rec.sessionId), encode(rec)).sadd(`${this.prefix}sessions`, rec.sessionId).exec());
  }
  async delete(id: string) {
    failed(await this.redis.multi().del(this.key(id)).srem(`${this.prefix}sessions`, id).exec());
  }
  async ping() {
    await this.redis.ping();
  }
  async list() {
    return (await this.redis.smembers(`${this.prefix}sessions`)).sort();
  }
  async close() {
    await this.redis.quit().catch(() => this.redis.disconnect());
  }
}

export async function openDirectory(spec: string, prefix: string): Promise<SessionDirectory> {
  if (spec === "memory") return new MemoryDirectory();
  if (spec.startsWith("redis://") || spec.startsWith("rediss://")) return RedisDirectory.connect(spec, prefix);
  throw new Error(`FREEKV_DIRECTORY: expected "memory" or redis://..., got ${spec}`);
}
