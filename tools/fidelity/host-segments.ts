/**
 * The host tier a fidelity (or benchmark) session needs: a session of the in-process kvstore
 * (model/localHost.ts), whose four segments (HND page store, two staging buffers, tail, manifest)
 * are sized with the one native layout, mapped here, and removed when the session is released,
 * or at the latest when the process exits.
 */
import type { Addon, Geometry, HostSegments, NativeLayout, Retrieval } from "../../native/binding.js";
import { attachLocalHost } from "../../services/compute/model/localHost.js";

export interface OwnedSegments {
  host: HostSegments;
  layout: NativeLayout;
  /** Unmaps the segments and releases the kvstore session (idempotent). */
  release(): void;
}

export function createHostSegments(addon: Addon, geometry: Geometry, retrieval: Retrieval, capacityPages: number, prefix = "fidelity"): OwnedSegments {
  const layout = addon.layout(geometry, retrieval, capacityPages);
  const local = attachLocalHost(geometry, retrieval, capacityPages, prefix);
  return { host: local.host, layout, release: () => void local.release() };
}
