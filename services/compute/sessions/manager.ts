/**
 * SessionManager: creates a session (validates it, attaches its segments at the kvstore, maps
 * them here, creates the engine session over them), finds it, closes it (engine first, then
 * ReleaseSession so the kvstore removes the segments), commits filled pages to the kvstore, and
 * at start re-attaches every session the kvstore still holds (a compute restart loses nothing).
 */
import { randomUUID } from "node:crypto";
import { loadAddon, type Engine, type HostSegments, type ShmSegment } from "../../../native/binding.js";
import { DType, type ModelGeometry, type RetrievalStats } from "../../../proto/gen/freekv/v1/common.js";
import { SessionKind, type CreateSessionRequest, type Session } from "../../../proto/gen/freekv/v1/compute.js";
import type { AttachSessionResponse, CommitPagesRequest, LayerPages } from "../../../proto/gen/freekv/v1/kvstore.js";
import { ServiceError, alreadyExists, failedPrecondition, invalidArgument, notFound } from "../../common/errors.js";
import { resolveGeometry, toNativeGeometry } from "../../common/geometry.js";
import type { Logger } from "../../common/log.js";
import { resolveRetrieval, toNativeRetrieval } from "../../common/retrieval.js";
import type { KvStoreClient } from "../kvstore-client.js";
import { crc32c } from "../../common/crc32c.js";
import { ComputeSession, kindName, type SessionMetadata } from "./session.js";
import { retrievalStats } from "./stats.js";
import { status } from "@grpc/grpc-js";

export const SESSION_ID_RE = /^[A-Za-z0-9._-]{1,128}$/;

export interface SessionManagerOptions {
  log: Logger;
  kvstore: KvStoreClient;
  engine: Engine;
  defaultMaxContextTokens: number;
  maxContextLimit: number;
  commitChecksums: boolean;
  /** Geometry of the served model (model sessions take it); throws the status of a call when there is none yet. */
  modelGeometry?: () => ModelGeometry;
  backend: string;
  /** KV storage type of sessions that leave it unspecified (and of model sessions): the backend's. */
  defaultKvDtype: DType;
  onChange?: (sessions: number) => void;
}

export class SessionManager {
  private readonly sessions = new Map<string, ComputeSession>();
  private cosineEdges: number[] | undefined;
  private readonly creating = new Set<string>();

  constructor(private readonly opts: SessionManagerOptions) {}

  get size(): number {
    return this.sessions.size;
  }

  list(): ComputeSession[] {
    return [...this.sessions.values()];
  }

  get engine(): Engine {
    return this.opts.engine;
  }

  get(id: string): ComputeSession {
    const s = this.sessions.get(id);
    if (!s) throw notFound(`session ${JSON.stringify(id)} not found`);
    return s;
  }

  has(id: string): boolean {
    return this.sessions.has(id);
  }

  async create(req: CreateSessionRequest, signal?: AbortSignal): Promise<ComputeSession> {
    const id = req.sessionId || `s-${randomUUID()}`;
    if (!SESSION_ID_RE.test(id)) throw invalidArgument("session_id", "must match [A-Za-z0-9._-]{1,128}");
    if (this.sessions.has(id) || this.creating.has(id)) throw alreadyExists(`session ${JSON.stringify(id)} already exists`);
    const kind = req.kind === SessionKind.SESSION_KIND_UNSPECIFIED ? SessionKind.SESSION_KIND_MODEL : req.kind;
    if (kind !== SessionKind.SESSION_KIND_MODEL && kind !== SessionKind.SESSION_KIND_ATTENTION) throw invalidArgument("kind", `unknown session kind ${req.kind}`);
    let geometry: ModelGeometry;
    if (kind === SessionKind.SESSION_KIND_ATTENTION) {
      geometry = resolveGeometry(req.geometry, "geometry", this.opts.defaultKvDtype);
    } else {
      if (!this.opts.modelGeometry) throw failedPrecondition("no model is served; use kind SESSION_KIND_ATTENTION with a geometry for attention-only sessions");
      const g = this.opts.modelGeometry();
      // The KV cache of the served model is stored in the backend's type.
      geometry = resolveGeometry({ ...g, kvDtype: this.opts.defaultKvDtype }, "model");
    }
    const retrieval = resolveRetrieval(req.retrieval, geometry.layers);
    const maxContextTokens = req.maxContextTokens || this.opts.defaultMaxContextTokens;
    if (maxContextTokens > this.opts.maxContextLimit) {
      throw invalidArgument("max_context_tokens", `must be <= ${this.opts.maxContextLimit}, got ${maxContextTokens}`);
    }
    this.creating.add(id);
    try {
      const metadata: SessionMetadata = { kind: kindName(kind) };
      const attach = await this.opts.kvstore.attach(
        { sessionId: id, geometry, retrieval, maxContextTokens, metadata: Buffer.from(JSON.stringify(metadata)) },
        signal,
      );
      if (!attach.created) throw alreadyExists(`session ${JSON.stringify(id)} already exists at the kvstore`);
      try {
        const s = this.open(id, kind, attach, metadata, false);
        this.sessions.set(id, s);
        this.opts.onChange?.(this.sessions.size);
        s.unnamed = !req.sessionId;
        this.opts.log[s.unnamed ? "debug" : "info"]({ session: id, kind: metadata.kind }, "session created");
        this.opts.log.debug({ session: id, segments: segmentNames(attach) }, "session segments");
        return s;
      } catch (e) {
        await this.opts.kvstore.release(id).catch(() => undefined);
        throw e;
      }
    } finally {
      this.creating.delete(id);
    }
  }

  /** Maps the segments and creates the engine session (when the engine exists). */
  private open(id: string, kind: SessionKind, attach: AttachSessionResponse, metadata: SessionMetadata, reattach: boolean): ComputeSession {
    const geometry = attach.geometry!;
    const retrieval = attach.retrieval!;
    const { ShmSegment } = loadAddon();
    const opened: ShmSegment[] = [];
    let host: HostSegments;
    try {
      const open = (name: string | undefined) => {
        const s = ShmSegment.open(name ?? "");
        opened.push(s);
        return s;
      };
      host = {
        store: open(attach.store?.name),
        staging: open(attach.staging?.name),
        tail: open(attach.tail?.name),
        manifest: open(attach.manifest?.name),
        capacityPages: attach.layout!.capacityPages,
      };
    } catch (e) {
      for (const s of opened) s.close();
      throw new ServiceError(status.UNAVAILABLE, `cannot map the kvstore's segments of ${id}: ${(e as Error).message}`);
    }
    let engineSession: number;
    const engine = this.opts.engine;
    try {
      engineSession = engine.createSession(toNativeGeometry(geometry), toNativeRetrieval(retrieval), host, reattach);
    } catch (e) {
      for (const s of opened) s.close();
      throw invalidArgument("session", `the engine refused it: ${(e as Error).message}`);
    }
    const s = new ComputeSession(id, kind, geometry, retrieval, attach.maxContextTokens, attach, host, engineSession, metadata);
    if (reattach) s.layerTokens.fill(engine.contextTokens(engineSession));
    return s;
  }

  /** Re-attaches every session the kvstore holds (after a compute restart). */
  async reattachAll(): Promise<number> {
    const { sessionIds } = await this.opts.kvstore.list();
    let n = 0;
    for (const id of sessionIds) {
      if (this.sessions.has(id)) continue;
      try {
        const attach = await this.opts.kvstore.attach({ sessionId: id });
        let metadata: SessionMetadata = { kind: "attention" };
        try {
          if (attach.metadata.length) metadata = JSON.parse(attach.metadata.toString("utf8")) as SessionMetadata;
        } catch {
          /* foreign metadata: keep the default */
        }
        const kind = metadata.kind === "model" ? SessionKind.SESSION_KIND_MODEL : SessionKind.SESSION_KIND_ATTENTION;
        const s = this.open(id, kind, attach, metadata, true);
        this.sessions.set(id, s);
        n++;
        this.opts.log.info({ session: id, contextTokens: s.contextTokens, committedPages: s.committedPages }, "session re-attached");
      } catch (e) {
        this.opts.log.error({ session: id, err: (e as Error).message }, "cannot re-attach session");
      }
    }
    this.opts.onChange?.(this.sessions.size);
    return n;
  }

  /**
   * Records at the kvstore the pages of `layer` that filled since the last commit (two-phase:
   * the engine wrote them into the store, now the kvstore learns they are valid). Which pages
   * are full and offloaded is the engine's answer (filledPages). Runs in the background, in order
   * per session.
   */
  commitProgress(s: ComputeSession, layer: number): void {
    this.commitLayers(s, [layer]);
  }

  /**
   * The same for every layer at once, after a decode step appended to all of them: the layers
   * whose pages filled go to the kvstore in one CommitPages call (with `layers`), not one call
   * per layer (a batch-16 step that fills a page in 32 layers made 512 calls).
   */
  commitProgressAll(s: ComputeSession): void {
    this.commitLayers(s, s.layerTokens.map((_, l) => l));
  }

  private commitLayers(s: ComputeSession, layers: number[]): void {
    const entries: LayerPages[] = [];
    let contextTokens = 0;
    for (const layer of layers) {
      if (!s.offloads(layer)) continue;
      const full = this.opts.engine.filledPages(s.engineSession, layer);
      const first = s.committedPages[layer];
      if (full <= first) continue;
      s.committedPages[layer] = full;
      contextTokens = Math.max(contextTokens, s.layerTokens[layer]);
      let checksums: number[] = [];
      if (this.opts.commitChecksums && s.host && s.attach.layout) {
        const l = s.attach.layout;
        const store = new Uint8Array(s.host.store.buffer());
        for (let p = first; p < full; p++) {
          const off = layer * l.layerStrideBytes + p * l.pageBytes;
          checksums.push(crc32c(store.subarray(off, off + l.pageBytes)));
        }
      }
      entries.push({ layer, firstPage: first, count: full - first, checksums });
    }
    if (entries.length === 0) return;
    const req: CommitPagesRequest =
      entries.length === 1
        ? { sessionId: s.id, ...entries[0], contextTokens, metadata: Buffer.alloc(0), layers: [] }
        : { sessionId: s.id, layer: 0, firstPage: 0, count: 0, checksums: [], contextTokens, metadata: Buffer.alloc(0), layers: entries };
    s.commitChain = s.commitChain.then(async () => {
      try {
        await this.opts.kvstore.commit(req);
      } catch (e) {
        s.commitError = e as Error;
        this.opts.log.error({ session: s.id, layers: entries.map((e) => e.layer), err: (e as Error).message }, "commit to the kvstore failed");
      }
    });
  }

  /** Commits the session's metadata at the kvstore (a CommitPages call without pages; kept for re-attach). */
  async commitMetadata(s: ComputeSession): Promise<void> {
    const layer = 0;
    const first = s.committedPages[layer];
    await s.commitChain;
    await this.opts.kvstore.commit({
      sessionId: s.id,
      layer,
      firstPage: first,
      count: 0,
      contextTokens: s.layerTokens[layer],
      checksums: [],
      metadata: Buffer.from(JSON.stringify(s.metadata)),
      layers: [],
    });
  }

  async close(id: string, signal?: AbortSignal): Promise<boolean> {
    const s = this.get(id);
    await s.lock.run(async () => {
      if (s.closed) throw notFound(`session ${JSON.stringify(id)} not found`);
      s.closed = true;
      this.sessions.delete(id);
      this.opts.onChange?.(this.sessions.size);
      await s.commitChain;
      this.detach(s);
    });
    await this.opts.kvstore.release(id, signal);
    this.opts.log[s.unnamed ? "debug" : "info"]({ session: id }, "session closed");
    return true;
  }

  /** Closes the engine session and unmaps the segments (the kvstore keeps them). */
  private detach(s: ComputeSession): void {
    try {
      this.opts.engine.closeSession(s.engineSession);
    } catch (e) {
      this.opts.log.warn({ session: s.id, err: (e as Error).message }, "engine closeSession failed");
    }
    if (s.host) for (const seg of [s.host.store, s.host.staging, s.host.tail, s.host.manifest]) seg.close();
  }

  /** At shutdown: finish commits, close engine sessions and mappings; the kvstore keeps the pages. */
  async shutdown(): Promise<void> {
    for (const s of this.sessions.values()) {
      await s.lock.run(async () => {
        s.closed = true;
        await s.commitChain;
        // A failed wait for the session's recalls still lets the process shut down (the pages are
        // in the kvstore), but it is logged: the session may need a re-attach check.
        await this.opts.engine.sync(s.engineSession).catch((e: Error) => this.opts.log.warn({ session: s.id, err: e.message }, "waiting for the session's background recalls failed at shutdown"));
        this.detach(s);
      });
    }
    this.sessions.clear();
  }

  stats(s: ComputeSession): RetrievalStats {
    this.cosineEdges ??= loadAddon().cosineBucketEdges();
    return retrievalStats(this.opts.engine.stats(s.engineSession), this.cosineEdges);
  }

  toProto(s: ComputeSession): Session {
    return {
      sessionId: s.id,
      kind: s.kind,
      geometry: s.geometry,
      retrieval: s.retrieval,
      maxContextTokens: s.maxContextTokens,
      contextTokens: s.contextTokens,
      stats: this.stats(s),
      backend: this.opts.backend,
    };
  }
}

function segmentNames(a: AttachSessionResponse): string[] {
  return [a.store, a.staging, a.tail, a.manifest].map((s) => s?.name ?? "?");
}
