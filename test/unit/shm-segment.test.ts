/**
 * Shared-memory segments through the addon: create/open/unlink, bytes shared between mappings,
 * clear errors, and no unmapping under a live engine session.
 */
import { describe, expect, it } from "vitest";
import { spawnSync } from "node:child_process";
import { existsSync, statSync } from "node:fs";
import { join } from "node:path";
import v8 from "node:v8";
import vm from "node:vm";
import { loadAddon } from "../../native/binding.js";
import { Prng, testSeed } from "./reference/prng.js";
import { createHost, geometryOf, retrievalOf } from "./reference/harness.js";

const addon = loadAddon();
const rng = new Prng(testSeed());
const uniqueName = () => `/fkv-shm-test-${process.pid}-${rng.int(1e9).toString(36)}`;

describe("ShmSegment", () => {
  it("shares bytes between two mappings, mode 0600, and unlinks", () => {
    const name = uniqueName();
    const a = addon.ShmSegment.create(name, 3 * 4096 + 5);
    expect(a.size).toBe(3 * 4096 + 5);
    expect(statSync(`/dev/shm${name}`).mode & 0o777).toBe(0o600);
    const src = rng.normals(a.size >> 2);
    new Float32Array(a.buffer(), 0, src.length).set(src);
    const b = addon.ShmSegment.open(name);
    expect(b.size).toBe(a.size);
    expect(Array.from(new Float32Array(b.buffer(), 0, src.length))).toEqual(Array.from(src));
    const buf = a.buffer();
    a.close();
    expect(buf.byteLength).toBe(0); // detached, never a dangling view
    expect(() => a.size).toThrow(/closed/);
    b.close();
    expect(addon.ShmSegment.unlink(name)).toBe(true);
    expect(existsSync(`/dev/shm${name}`)).toBe(false);
    expect(addon.ShmSegment.unlink(name)).toBe(false);
  });

  it("buffers nobody holds are collected, and those still held are detached at close", () => {
    v8.setFlagsFromString("--expose-gc");
    const gc = vm.runInNewContext("gc") as () => void;
    const name = uniqueName();
    const seg = addon.ShmSegment.create(name, 16 * 4096);
    const held = Array.from({ length: 5 }, (_, i) => new Uint8Array(seg.buffer(i * 4096, 4096)));
    gc();
    const before = process.memoryUsage().heapUsed;
    const n = 200_000 + rng.int(50_000);
    for (let i = 0; i < n; i++) seg.buffer((i % 16) * 4096, 4096);
    gc();
    const grown = process.memoryUsage().heapUsed - before;
    // Kept until close, each of them took ~100 bytes of heap: ~20 MB here.
    expect(grown, `heap grew by ${grown} bytes over ${n} buffers`).toBeLessThan(4 << 20);
    seg.close();
    for (const h of held) expect(h.byteLength).toBe(0);
    addon.ShmSegment.unlink(name);
  });

  it("a segment dropped without close() stays mapped while a buffer of it is held, and is collected after", () => {
    // In a child process: without the fix the buffer's bytes are unmapped under it and the
    // process dies of SIGSEGV.
    const name = uniqueName();
    const shm = join(import.meta.dirname, "..", "..", "native", "shm.ts");
    const script = `
      import { loadShm } from ${JSON.stringify(shm)};
      const { ShmSegment } = loadShm();
      const name = ${JSON.stringify(name)};
      let collected = false;
      const registry = new FinalizationRegistry(() => { collected = true; });
      let view;
      (() => {
        const seg = ShmSegment.create(name, 1 << 20);
        registry.register(seg, 0);
        view = new Float64Array(seg.buffer(4096, 8192));
      })();
      const settle = async () => { for (let i = 0; i < 8; i++) { gc(); await new Promise((r) => setImmediate(r)); } };
      await settle();
      const collectedWhileHeld = collected;
      const values = Array.from({ length: view.length }, (_, i) => Math.sin(${rng.int(1e6)} + i));
      view.set(values);
      const other = ShmSegment.open(name);
      const seen = Array.from(new Float64Array(other.buffer(4096, 8192)));
      other.close();
      view = undefined;
      await settle();
      ShmSegment.unlink(name);
      console.log(JSON.stringify({ collectedWhileHeld, shared: seen.every((v, i) => v === values[i]), collectedAfter: collected }));
    `;
    const r = spawnSync(process.execPath, ["--expose-gc", "--import", "tsx", "--input-type=module", "-e", script], { encoding: "utf8", timeout: 60_000 });
    addon.ShmSegment.unlink(name);
    expect(r.signal, r.stderr).toBeNull();
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout.trim().split("\n").pop()!)).toEqual({ collectedWhileHeld: false, shared: true, collectedAfter: true });
  });

  it("names the problem on bad arguments", () => {
    const name = uniqueName();
    expect(() => addon.ShmSegment.create("no-slash", 10)).toThrow(/name must look like/);
    expect(() => addon.ShmSegment.create("/a/b", 10)).toThrow(/name must look like/);
    expect(() => addon.ShmSegment.create(name, 0)).toThrow(/size must be > 0/);
    expect(() => addon.ShmSegment.open(name)).toThrow(/No such file/);
    const s = addon.ShmSegment.create(name, 64);
    expect(() => addon.ShmSegment.create(name, 64)).toThrow(/File exists/);
    s.close();
    addon.ShmSegment.unlink(name);
  });

  it("allocateAsync commits ranges off the main thread, all or none, and checks its arguments", async () => {
    const name = uniqueName();
    const seg = addon.ShmSegment.create(name, 64 << 20);
    try {
      expect(seg.allocatedBytes()).toBe(0);
      // Random 4 KiB-aligned ranges, some overlapping.
      const ranges: [number, number][] = [];
      const pages = new Set<number>();
      for (let i = 0; i < 6; i++) {
        const a = rng.int(16384 - 64), n = 1 + rng.int(64);
        ranges.push([a * 4096, n * 4096]);
        for (let p = a; p < a + n; p++) pages.add(p);
      }
      // Half the ranges by fallocate, half by write faults from 1-4 threads: the same pages.
      await seg.allocateAsync(ranges.slice(0, 3));
      await seg.allocateAsync(ranges.slice(3), 1 + rng.int(4));
      expect(seg.allocatedBytes()).toBe(pages.size * 4096);
      // Written through the mapping before a growth, kept by a commit over it in either mode.
      const probe = ranges[0][0] + 8;
      new Uint8Array(seg.buffer(probe, 1))[0] = 0xa5;
      await seg.allocateAsync([[Math.max(0, ranges[0][0] - 4096), 3 * 4096]], 2);
      expect(new Uint8Array(seg.buffer(probe, 1))[0]).toBe(0xa5);
      // Checked at the call: nothing allocated by a call that throws.
      const held = seg.allocatedBytes();
      expect(() => seg.allocateAsync([[0, (64 << 20) + 1]])).toThrow(RangeError);
      expect(() => seg.allocateAsync([[-1, 10]])).toThrow(RangeError);
      expect(() => seg.allocateAsync([[1.5, 10]])).toThrow(RangeError);
      expect(() => seg.allocateAsync([[0]] as never)).toThrow(TypeError);
      expect(() => seg.allocateAsync("x" as never)).toThrow(TypeError);
      expect(() => seg.allocateAsync([[100, 4096]], 2)).toThrow(/multiples of 4096/);
      expect(() => seg.allocateAsync([[0, 4096]], 65)).toThrow(RangeError);
      expect(seg.allocatedBytes()).toBe(held);
      // The name is gone: fallocate, which opens it, fails with the reason.
      seg.punch(0, 64 << 20);
      addon.ShmSegment.unlink(name);
      await expect(seg.allocateAsync([[0, 4096]])).rejects.toMatchObject({ code: "EIO", message: expect.stringMatching(/fallocate|open/) });
    } finally {
      seg.close();
      addon.ShmSegment.unlink(name);
    }
    expect(() => seg.allocateAsync([[0, 4096]])).toThrow(/closed/);
  });

  it("allocateAsync with rollback false keeps the ranges it did when it is stopped: pages written meanwhile survive", async () => {
    // A commit stopped by close() (a kvstore shutting down with its segments persisted) after some
    // of its ranges: with rollback, those ranges would be punched, zeroing pages another mapping
    // wrote there. Repeated, since where the worker stands at close() is up to the scheduler.
    let stopped = 0;
    for (let trial = 0; trial < 40; trial++) {
      const name = uniqueName();
      const seg = addon.ShmSegment.create(name, 64 << 20);
      try {
        const ranges: [number, number][] = Array.from({ length: 256 }, (_, i) => [i * 65536, 65536]);
        // Pages of every range written before the commit, as a caller that commits its own pages does.
        const marks = ranges.map(([o]) => o + 8 * rng.int(8000));
        const values = marks.map(() => 1 + rng.int(255));
        marks.forEach((m, i) => (new Uint8Array(seg.buffer(m, 1))[0] = values[i]));
        const p = seg.allocateAsync(ranges, 0, false);
        // Let the worker start before stopping it.
        if (trial % 2) await new Promise((r) => setImmediate(r));
        seg.close();
        if (await p.then(() => false, () => true)) stopped++;
        const again = addon.ShmSegment.open(name);
        try {
          expect(marks.map((m) => new Uint8Array(again.buffer(m, 1))[0])).toEqual(values);
        } finally {
          again.close();
        }
      } finally {
        addon.ShmSegment.unlink(name);
      }
    }
    const name = uniqueName();
    const seg = addon.ShmSegment.create(name, 4096);
    expect(() => seg.allocateAsync([[0, 4096]], 0, 1 as never)).toThrow(/rollback must be a boolean/);
    seg.close();
    addon.ShmSegment.unlink(name);
    // Stopped at least once: the case under test happened.
    expect(stopped).toBeGreaterThan(0);
  });

  it("closeAsync unmaps off the main thread: buffers detached at the call, the memory freed once it resolves", async () => {
    const name = uniqueName();
    const seg = addon.ShmSegment.create(name, 128 << 20);
    await seg.allocateAsync([[0, 128 << 20]]);
    // Touched through this mapping (its page tables filled): the unmap has work to do.
    const bytes = new Uint8Array(seg.buffer());
    for (let i = 0; i < bytes.length; i += 4096) bytes[i] = 1 + rng.int(255);
    expect(seg.allocatedBytes()).toBe(128 << 20);
    const other = addon.ShmSegment.open(name);
    expect(addon.ShmSegment.unlink(name)).toBe(true);
    let turned = false;
    setImmediate(() => (turned = true));
    const closing = seg.closeAsync();
    expect(bytes.byteLength).toBe(0); // detached at the call
    expect(() => seg.size).toThrow(/closed/);
    await closing;
    expect(turned).toBe(true);
    // The other mapping still reads what was written; closing it too is safe twice over.
    expect(new Uint8Array(other.buffer(0, 1))[0]).toBeGreaterThan(0);
    await other.closeAsync();
    await other.closeAsync();
    other.close();
  });

  it("a closed segment's unmap waits between pieces while this process commits another (FREEKV_TEARDOWN_YIELD_MS), within its budget", () => {
    // In a child process per budget (the addon reads the setting once): segment A (512 MiB,
    // touched: 8 pieces to unmap) is closed while segment B (1 GiB) is being committed from one
    // thread, the work a teardown steps aside for. Run under 0 (never waits), a budget longer
    // than B's commit (waits until it ends) and a short one (waits that long, then goes on).
    const shm = join(import.meta.dirname, "..", "..", "native", "shm.ts");
    const run = (budgetMs: number) => {
      const a = uniqueName(), b = uniqueName();
      const script = `
        import { loadShm } from ${JSON.stringify(shm)};
        const addon = loadShm();
        const { ShmSegment } = addon;
        const A = ShmSegment.create(${JSON.stringify(a)}, 512 << 20);
        const bytes = new Uint8Array(A.buffer());
        for (let i = 0; i < bytes.length; i += 4096) bytes[i] = 1 + (i % 251);
        const B = ShmSegment.create(${JSON.stringify(b)}, 1024 ** 3);
        ShmSegment.unlink(${JSON.stringify(a)});
        ShmSegment.unlink(${JSON.stringify(b)});
        const t0 = performance.now();
        let committed = -1, closed = -1;
        const commit = B.allocateAsync([[0, 1024 ** 3]], 1).then(() => { committed = performance.now() - t0; });
        await new Promise((r) => setTimeout(r, 30));
        const close = A.closeAsync().then(() => { closed = performance.now() - t0; });
        await Promise.all([commit, close]);
        const stats = addon.teardownStats();
        B.close();
        console.log(JSON.stringify({ committed, closed, ...stats }));
      `;
      const r = spawnSync(process.execPath, ["--import", "tsx", "--input-type=module", "-e", script], {
        encoding: "utf8",
        timeout: 120_000,
        env: { ...process.env, FREEKV_TEARDOWN_YIELD_MS: String(budgetMs) },
      });
      addon.ShmSegment.unlink(a);
      addon.ShmSegment.unlink(b);
      expect(r.signal, r.stderr).toBeNull();
      expect(r.status, r.stderr).toBe(0);
      return JSON.parse(r.stdout.trim().split("\n").pop()!) as { committed: number; closed: number; waitedMs: number; piecesWaited: number; foreground: number };
    };
    const never = run(0);
    expect(never.waitedMs).toBe(0);
    expect(never.piecesWaited).toBe(0);
    expect(never.closed).toBeLessThan(never.committed); // the unmap ran beside the commit
    const long = run(60_000);
    expect(long.piecesWaited).toBeGreaterThanOrEqual(1);
    expect(long.waitedMs).toBeGreaterThan(0);
    expect(long.closed).toBeGreaterThanOrEqual(long.committed); // the rest of the unmap waited for the commit
    expect(long.foreground).toBe(0);
    const short = run(40);
    expect(short.piecesWaited).toBeGreaterThanOrEqual(1);
    expect(short.waitedMs).toBeGreaterThanOrEqual(35);
    expect(short.waitedMs).toBeLessThan(40 + 25); // the budget is the whole teardown's, not a piece's
  });

  it("refuses to close a segment that an engine session maps", async () => {
    const c = {
      qHeads: 4, kvHeads: 2, headDim: 8, pageSize: 4, sinkTokens: 4, windowTokens: 8, selectTokens: 8,
      tau: 0.9, summary: "maxmin", combine: "softmax_mean", mode: "freekv", dtype: "f32",
    } as const;
    const g = geometryOf(c, 1);
    const r = retrievalOf(c);
    const host = createHost(g, r, 4);
    const engine = new addon.Engine({ backend: "cpu", threads: 1 });
    const session = engine.createSession(g, r, host.segments, false);
    expect(() => host.segments.store.close()).toThrow(/in use by 1 engine session/);
    expect(() => host.segments.tail.close()).toThrow(/close the session first/);
    engine.closeSession(session);
    await host.dispose();
  });
});
