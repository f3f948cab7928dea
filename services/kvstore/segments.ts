/**
 * A session's four shared-memory segments (store, staging, tail, manifest), created by the
 * kvstore with unguessable names (128 random bits, mode 0600 by the addon) that carry the kvstore
 * process that made them, and mapped here too, so the kvstore can initialise the manifest and
 * verify commit checksums. A kvstore killed without its shutdown leaves its segments behind; the
 * next one removes those of makers that are gone and that its directory does not hold
 * (sweepStaleSegments).
 */
import { createHash, randomBytes } from "node:crypto";
import { readdirSync } from "node:fs";
import { ownerAlive, ownerTag } from "../common/process-owner.js";
import { loadShm, type ShmSegment } from "../../native/shm.js";
import type { SegmentRef } from "../../proto/gen/freekv/v1/common.js";
import type { Layout } from "./layout.js";

export type SegmentKind = "store" | "staging" | "tail" | "manifest";
export const SEGMENT_KINDS: readonly SegmentKind[] = ["store", "staging", "tail", "manifest"];

export type SessionSegments = Record<SegmentKind, ShmSegment>;

/**
 * Whether this process's session directory is in memory ("m": nothing can adopt its segments
 * after it dies) or persistent ("p" and the directory's tag: a successor adopts them from that
 * directory). The kvstore process sets it at start; a segment's name carries it.
 */
let directoryKind = "p";
export function setDirectoryKind(kind: "memory" | "persistent", tag?: string): void {
  directoryKind = kind === "memory" ? "m" : `p${tag ?? ""}`;
}

/**
 * A persistent directory's tag in its segments' names: 12 hex digits of a hash of the database its
 * URL names (host, port, database number; not the credentials, the scheme or the options, which
 * an operator may change between two starts: a rotated password must not hide the segments a
 * killed kvstore left from the next start's sweep) and its key prefix.
 */
export function directoryTag(url: string, prefix: string): string {
  return createHash("sha256").update(`${directoryIdentity(url)}\0${prefix}`).digest("hex").slice(0, 12);
}

/** "host:port/db" of a redis:// or rediss:// URL (port 6379 and database 0 when left out); another text as it is. */
export function directoryIdentity(url: string): string {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    return url;
  }
  if (u.protocol !== "redis:" && u.protocol !== "rediss:") return url;
  const db = u.pathname.replace(/^\/+|\/+$/g, "") || "0";
  return `${u.hostname.toLowerCase()}:${u.port || "6379"}/${db}`;
}

/**
 * "/freekv-kv-<pid>-<start time>-<m|p<directory tag>>-" (the making process, process-owner.ts,
 * and its directory) + 128 random bits; with a tag (in-process stores: their sessions' ids, which
 * name their own process) "/freekv-<tag>-" + 128 random bits instead; an in-process store removes
 * its segments at exit.
 */
export const segmentName = (tag?: string) => (tag ? `/freekv-${tag}-` : `/freekv-kv-${ownerTag}-${directoryKind}-`) + randomBytes(16).toString("hex");

/** A kvstore's segment name: its maker (pid, start time) and its directory ("m", or "p" and the directory's tag; "p" alone before tags). */
const SEGMENT_NAME = /^freekv-kv-(\d+)-(\d+)-(m|p[0-9a-f]*)-/;

/**
 * Removes the session segments in `dir` made by kvstore processes that are gone (pid not running,
 * or running with another start time) and had an in-memory directory, or this process's
 * persistent directory (`ownDirectory`, "p" and its tag), except the names in `keep` (those that
 * directory's records hold, which are adopted): a dead kvstore of this directory killed between
 * making a session's segments and recording them (a create, an import), or between deleting a
 * record and unlinking its segments, left them to nobody. A live kvstore's segments are never
 * touched, nor those of another persistent directory (its own successor, which may share this
 * host's /dev/shm, adopts or sweeps them). Returns the names removed.
 */
export function sweepStaleSegments(keep: ReadonlySet<string>, dir = "/dev/shm", ownDirectory = directoryKind): string[] {
  let entries: string[];
  try {
    entries = readdirSync(dir);
  } catch {
    return [];
  }
  const { ShmSegment } = loadShm();
  const removed: string[] = [];
  for (const e of entries) {
    const m = SEGMENT_NAME.exec(e);
    if (!m || (m[3] !== "m" && (m[3] !== ownDirectory || ownDirectory === "p")) || keep.has(`/${e}`) || ownerAlive(Number(m[1]), m[2])) continue;
    try {
      if (ShmSegment.unlink(`/${e}`)) removed.push(`/${e}`);
    } catch {
      // Not ours to remove (permissions): leave it.
    }
  }
  return removed;
}

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

/**
 * closeSegments with the unmaps on worker threads (ShmSegment.closeAsync): a released session of
 * gigabytes is unmapped, and its memory freed, while the event loop serves other sessions.
 * Resolves once every segment is unmapped.
 */
export async function closeSegmentsAsync(s: SessionSegments, unlink: boolean): Promise<void> {
  const { ShmSegment } = loadShm();
  const closing: Promise<void>[] = [];
  for (const k of SEGMENT_KINDS) {
    if (unlink) ShmSegment.unlink(s[k].name);
    closing.push(s[k].closeAsync());
  }
  await Promise.all(closing);
}

/** Removes segment names (whether or not mapped here); ignores those already gone. */
export function unlinkNames(refs: Record<SegmentKind, SegmentRef>): void {
  const { ShmSegment } = loadShm();
  for (const k of SEGMENT_KINDS) ShmSegment.unlink(refs[k].name);
}
