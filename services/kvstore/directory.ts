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
  get(id: string): Promise<SessionRecord | undefined>;
  put(rec: SessionRecord): Promise<void>;
  delete(id: string): Promise<void>;
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

function decode(s: string): SessionRecord {
  const o = JSON.parse(s) as Record<string, unknown>;
  return {
    ...(o as unknown as SessionRecord),
    geometry: ModelGeometry.fromJSON(o.geometry),
    retrieval: RetrievalConfig.fromJSON(o.retrieval),
    metadata: Buffer.from(String(o.metadata ?? ""), "base64"),
  };
}

/** A MULTI's result: null when it was discarded, or per-command errors; either fails the write. */
function failed(res: [Error | null, unknown][] | null): void {
  if (res === null) throw new Error("the transaction was discarded");
  for (const [e] of res) if (e) throw e;
}

/** Sessions as JSON strings under `<prefix>session:<id>`, ids in the set `<prefix>sessions`. */
export class RedisDirectory implements SessionDirectory {
  readonly kind = "redis" as const;
  private constructor(
    private readonly redis: Redis,
    private readonly prefix: string,
  ) {}

  static async connect(url: string, prefix: string): Promise<RedisDirectory> {
    const redis = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 2, enableOfflineQueue: false, connectTimeout: 3000 });
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
    return s === null ? undefined : decode(s);
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
