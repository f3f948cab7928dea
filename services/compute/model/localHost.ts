/**
 * An in-process host tier for the command line and the tests: the four segments of a session
 * (store, staging, tail, manifest) made here with ShmSegment.create at the sizes Engine.layout
 * gives, the manifest header written as the kvstore would, and everything unlinked on close (and
 * at process exit, for a run that is interrupted). The service instead gets its segments from
 * the kvstore process.
 */
import { randomBytes } from "node:crypto";
import { loadAddon, KvDType, type Engine, type Geometry, type HostSegments, type Retrieval, type ShmSegment } from "../../../native/binding.js";
import type { ModelConfigNative } from "../../../native/binding.js";

const MANIFEST_MAGIC = 0x31564b46;
const live = new Set<string>();
let exitHook = false;

function unlinkAtExit(name: string): void {
  live.add(name);
  if (exitHook) return;
  exitHook = true;
  const unlinkAll = () => {
    const { ShmSegment } = loadAddon();
    for (const n of live) ShmSegment.unlink(n);
    live.clear();
  };
  process.on("exit", unlinkAll);
  // An interrupted command (Ctrl-C, kill) would otherwise skip the exit handlers.
  for (const sig of ["SIGINT", "SIGTERM"] as const) {
    process.once(sig, () => {
      unlinkAll();
      process.exit(128 + (sig === "SIGINT" ? 2 : 15));
    });
  }
}

export function modelGeometry(c: ModelConfigNative, kvDtype: KvDType = KvDType.F32): Geometry {
  return { layers: c.layers, qHeads: c.qHeads, kvHeads: c.kvHeads, headDim: c.headDim, kvDtype };
}

export interface LocalSession {
  /** The engine's session handle. */
  session: number;
  host: HostSegments;
  close(): Promise<void>;
}

/** Creates segments for `maxContextTokens` tokens and an engine session over them. */
export function createLocalSession(engine: Engine, geometry: Geometry, retrieval: Retrieval, maxContextTokens: number): LocalSession {
  const { ShmSegment, Engine: EngineClass } = loadAddon();
  const capacityPages = Math.ceil(maxContextTokens / retrieval.pageSize) + 1;
  const l = EngineClass.layout(geometry, retrieval, capacityPages);
  const tag = randomBytes(8).toString("hex");
  const made: ShmSegment[] = [];
  const make = (kind: string, size: number) => {
    const name = `/freekv-local-${process.pid}-${tag}-${kind}`;
    const s = ShmSegment.create(name, Math.max(4096, size));
    unlinkAtExit(name);
    made.push(s);
    return s;
  };
  const cleanup = () => {
    for (const s of made) {
      ShmSegment.unlink(s.name);
      live.delete(s.name);
      s.close();
    }
  };
  let host: HostSegments;
  let session: number;
  try {
    host = {
      store: make("store", l.storeBytes),
      staging: make("staging", 2 * l.stagingBufferBytes),
      tail: make("tail", l.tailBytes),
      manifest: make("manifest", l.manifestBytes),
      capacityPages,
    };
    const header = new DataView(host.manifest.buffer(), 0, 16);
    header.setUint32(0, MANIFEST_MAGIC, true);
    header.setUint32(4, geometry.layers, true);
    header.setBigUint64(8, 0n, true);
    session = engine.createSession(geometry, retrieval, host, false);
  } catch (e) {
    cleanup();
    throw e;
  }
  let closed = false;
  return {
    session,
    host,
    async close() {
      if (closed) return;
      closed = true;
      try {
        await engine.sync(session);
        engine.closeSession(session);
      } finally {
        cleanup();
      }
    },
  };
}
