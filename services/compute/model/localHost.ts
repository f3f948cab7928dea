/**
 * The host tier of a session run in this process (the command line, benchmarks, tests): the
 * session is attached to the in-process kvstore (services/kvstore/local.ts), which creates and
 * initialises its four segments as the kvstore process would; this side maps them by name, as
 * the compute service does, and creates the engine session over them. The service instead
 * attaches through the kvstore process.
 */
import { DType } from "../../../proto/gen/freekv/v1/common.js";
import { loadAddon, type Engine, type Geometry, type HostSegments, type ModelConfigNative, type Retrieval, type ShmSegment } from "../../../native/binding.js";
import { localKvStore, localSessionId } from "../../kvstore/local.js";

export function modelGeometry(c: ModelConfigNative, kvDtype: DType = DType.D_TYPE_FLOAT32): Geometry {
  return { layers: c.layers, qHeads: c.qHeads, kvHeads: c.kvHeads, headDim: c.headDim, kvDtype };
}

export interface LocalHost {
  host: HostSegments;
  /** Unmaps the segments here and releases the kvstore session (idempotent). */
  release(): Promise<void>;
}

/** Attaches a kvstore session for `capacityPages` pages and maps its segments here. */
export function attachLocalHost(geometry: Geometry, retrieval: Retrieval, capacityPages: number, prefix = "local"): LocalHost {
  const store = localKvStore();
  const id = localSessionId(prefix);
  const res = store.attachLocal(
    id,
    { layers: geometry.layers, queryHeads: geometry.qHeads, kvHeads: geometry.kvHeads, headDim: geometry.headDim, kvDtype: geometry.kvDtype },
    { ...retrieval, denseLayers: [...retrieval.denseLayers], tauSet: true },
    capacityPages * retrieval.pageSize,
  );
  const { ShmSegment } = loadAddon();
  const mapped: ShmSegment[] = [];
  let released = false;
  const release = async () => {
    if (released) return;
    released = true;
    for (const s of mapped) s.close();
    await store.release(id);
  };
  try {
    const open = (ref: { name: string } | undefined) => {
      const s = ShmSegment.open(ref!.name);
      mapped.push(s);
      return s;
    };
    const host: HostSegments = { store: open(res.store), staging: open(res.staging), tail: open(res.tail), manifest: open(res.manifest), capacityPages: res.layout!.capacityPages };
    return { host, release };
  } catch (e) {
    void release();
    throw e;
  }
}

export interface LocalSession {
  /** The engine's session handle. */
  session: number;
  host: HostSegments;
  close(): Promise<void>;
}

/** A kvstore session for `maxContextTokens` tokens (and one page more) and an engine session over it. */
export function createLocalSession(engine: Engine, geometry: Geometry, retrieval: Retrieval, maxContextTokens: number): LocalSession {
  const local = attachLocalHost(geometry, retrieval, Math.ceil(maxContextTokens / retrieval.pageSize) + 1);
  let session: number;
  try {
    session = engine.createSession(geometry, retrieval, local.host, false);
  } catch (e) {
    void local.release();
    throw e;
  }
  let closed = false;
  return {
    session,
    host: local.host,
    async close() {
      if (closed) return;
      closed = true;
      try {
        await engine.sync(session);
        engine.closeSession(session);
      } finally {
        await local.release();
      }
    },
  };
}
