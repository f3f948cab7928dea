/**
 * The host tier a fidelity (or benchmark) session needs: the four shared-memory segments the
 * kvstore would own (HND page store, two staging buffers, tail, manifest), sized with the
 * engine's own layout. The harness runs without a kvstore, so it creates them itself under
 * unique names and unlinks them when the session closes, or at the latest when the process exits.
 */
import { randomBytes } from "node:crypto";
import type { Addon, Geometry, HostSegments, NativeLayout, Retrieval, ShmSegment } from "../../native/binding.js";

const live = new Set<string>();
let hooked = false;
let seq = 0;

function unlinkAll(addon: Addon): void {
  for (const name of live) {
    try {
      addon.ShmSegment.unlink(name);
    } catch {
      // already gone
    }
  }
  live.clear();
}

export interface OwnedSegments {
  host: HostSegments;
  layout: NativeLayout;
  /** Unmaps and unlinks all four segments (idempotent). */
  release(): void;
}

export function createHostSegments(addon: Addon, geometry: Geometry, retrieval: Retrieval, capacityPages: number, prefix = "fidelity"): OwnedSegments {
  if (!hooked) {
    hooked = true;
    process.once("exit", () => unlinkAll(addon));
    for (const sig of ["SIGINT", "SIGTERM"] as const)
      process.once(sig, () => {
        unlinkAll(addon);
        process.exit(130);
      });
  }
  const layout = addon.Engine.layout(geometry, retrieval, capacityPages);
  const tag = `/freekv-${prefix}-${process.pid}-${++seq}-${randomBytes(4).toString("hex")}`;
  const made: ShmSegment[] = [];
  const make = (part: string, size: number): ShmSegment => {
    const name = `${tag}-${part}`;
    const seg = addon.ShmSegment.create(name, Math.max(4096, size));
    live.add(name);
    made.push(seg);
    return seg;
  };
  let released = false;
  const release = () => {
    if (released) return;
    released = true;
    for (const s of made) {
      const name = s.name;
      try {
        s.close();
      } catch {
        // closed already
      }
      try {
        addon.ShmSegment.unlink(name);
      } catch {
        // gone already
      }
      live.delete(name);
    }
  };
  try {
    const host: HostSegments = {
      store: make("store", layout.storeBytes),
      staging: make("staging", 2 * layout.stagingBufferBytes),
      tail: make("tail", layout.tailBytes),
      manifest: make("manifest", layout.manifestBytes),
      capacityPages,
    };
    return { host, layout, release };
  } catch (e) {
    release();
    throw e;
  }
}
