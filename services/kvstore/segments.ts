/**
 * A session's four shared-memory segments (store, staging, tail, manifest), created by the
 * kvstore with unguessable names ("/freekv-" + 128 random bits, mode 0600 by the addon) and
 * mapped here too, so the kvstore can initialise the manifest and verify commit checksums.
 */
import { randomBytes } from "node:crypto";
import { loadShm, type ShmSegment } from "../../native/shm.js";
import type { SegmentRef } from "../../proto/gen/freekv/v1/common.js";
import type { Layout } from "./layout.js";

export type SegmentKind = "store" | "staging" | "tail" | "manifest";
export const SEGMENT_KINDS: readonly SegmentKind[] = ["store", "staging", "tail", "manifest"];

export type SessionSegments = Record<SegmentKind, ShmSegment>;

/** "/freekv-" + 128 random bits; with a tag (in-process sessions: their id) after "/freekv-". */
export const segmentName = (tag?: string) => `/freekv-${tag ? `${tag}-` : ""}${randomBytes(16).toString("hex")}`;

export function segmentSizes(l: Layout): Record<SegmentKind, number> {
  return { store: l.storeBytes, staging: 2 * l.stagingBufferBytes, tail: l.tailBytes, manifest: l.manifestBytes };
}

/** Creates all four segments (removing those already made if one fails) and initialises the manifest. */
export function createSegments(l: Layout, layers: number, tag?: string): SessionSegments {
  const { ShmSegment, initManifest } = loadShm();
  const sizes = segmentSizes(l);
  const made: Partial<SessionSegments> = {};
  try {
    for (const k of SEGMENT_KINDS) made[k] = ShmSegment.create(segmentName(tag), sizes[k]);
  } catch (e) {
    for (const s of Object.values(made)) {
      ShmSegment.unlink(s.name);
      s.close();
    }
    throw e;
  }
  const segs = made as SessionSegments;
  initManifest(segs.manifest.buffer(), layers);
  return segs;
}

/** Maps segments that already exist (a kvstore restart with a persistent directory). */
export function openSegments(refs: Record<SegmentKind, SegmentRef>): SessionSegments {
  const { ShmSegment } = loadShm();
  const opened: Partial<SessionSegments> = {};
  try {
    for (const k of SEGMENT_KINDS) {
      const s = ShmSegment.open(refs[k].name);
      opened[k] = s;
      if (s.size < refs[k].sizeBytes) throw new Error(`segment ${refs[k].name} is ${s.size} bytes, expected ${refs[k].sizeBytes}`);
    }
  } catch (e) {
    for (const s of Object.values(opened)) s.close();
    throw e;
  }
  return opened as SessionSegments;
}

export function refsOf(s: SessionSegments): Record<SegmentKind, SegmentRef> {
  const r = {} as Record<SegmentKind, SegmentRef>;
  for (const k of SEGMENT_KINDS) r[k] = { name: s[k].name, sizeBytes: s[k].size };
  return r;
}

export function closeSegments(s: SessionSegments, unlink: boolean): void {
  const { ShmSegment } = loadShm();
  for (const k of SEGMENT_KINDS) {
    if (unlink) ShmSegment.unlink(s[k].name);
    s[k].close();
  }
}

/** Removes segment names (whether or not mapped here); ignores those already gone. */
export function unlinkNames(refs: Record<SegmentKind, SegmentRef>): void {
  const { ShmSegment } = loadShm();
  for (const k of SEGMENT_KINDS) ShmSegment.unlink(refs[k].name);
}
