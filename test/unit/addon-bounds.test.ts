/**
 * The addon's entry points refuse what would crash or exhaust the process, with a JavaScript
 * error, and stay usable afterwards: buffers past Node's 4 GiB limit, a manifest past 1 GiB,
 * retrieval budgets past 2^20 tokens, a device tier larger than the store can fill, getters that
 * close a segment in the middle of a call, logits past one array, unbounded model threads and
 * shapes, and the classes used after a worker thread that loaded the addon has ended.
 */
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { loadAddon, type Geometry, type Retrieval, type ShmSegment } from "../../native/binding.js";
import { loadShm } from "../../native/shm.js";
import { Prng, testSeed } from "./reference/prng.js";

const addon = loadAddon();
const rng = new Prng(testSeed());
const uniqueName = () => `/fkv-bounds-test-${process.pid}-${rng.int(1e9).toString(36)}`;

function segment(bytes: number): ShmSegment {
  const name = uniqueName();
  const s = addon.ShmSegment.create(name, bytes);
  addon.ShmSegment.unlink(name);
  return s;
}

const GEO: Geometry = { layers: 2, qHeads: 2, kvHeads: 1, headDim: 8, kvDtype: 1 };
const RET: Retrieval = { ...loadShm().retrievalDefaults(), pageSize: 4, sinkTokens: 4, windowTokens: 8, selectTokens: 8 };

function host(geo: Geometry, ret: Retrieval, capacityPages: number) {
  const l = addon.layout(geo, ret, capacityPages);
  const segs = { store: segment(l.storeBytes), staging: segment(2 * l.stagingBufferBytes), tail: segment(l.tailBytes), manifest: segment(l.manifestBytes) };
  addon.initManifest(segs.manifest.buffer(), geo.layers);
  return segs;
}

describe("addon bounds", () => {
  it("a buffer over more than 4 GiB of a segment is refused; ranges reach past 4 GiB", () => {
    const s = segment(2 ** 32 + 8192); // sparse: nothing is allocated
    try {
      expect(() => s.buffer()).toThrow(RangeError);
      expect(() => s.buffer(0, 2 ** 32 + 4096)).toThrow(/at most 4 GiB/);
      const bytes = Uint8Array.from({ length: 4096 }, () => rng.int(256));
      new Uint8Array(s.buffer(2 ** 32, 4096)).set(bytes);
      expect(Array.from(new Uint8Array(s.buffer(2 ** 32, 4096)))).toEqual(Array.from(bytes));
      expect(s.buffer(0, 2 ** 32).byteLength).toBe(2 ** 32);
    } finally {
      s.close();
    }
  });

  it("a layout whose manifest would pass 1 GiB, or a budget past 2^20 tokens, is refused by name", () => {
    expect(() => addon.layout({ layers: 1024, qHeads: 1024, kvHeads: 1, headDim: 1024, kvDtype: 1 }, RET, 1)).toThrow(/manifest.*more than 1 GiB/);
    expect(() => addon.layout(GEO, { ...RET, windowTokens: 2 ** 21 }, 1)).toThrow(/windowTokens must be <= 1048576/);
    expect(() => addon.layout(GEO, { ...RET, selectTokens: 2 ** 22 }, 1)).toThrow(/selectTokens must be <= 1048576/);
  });

  it("a session's device tier holds no more pages than its store, whatever budget it asks for", () => {
    // 2^16 window tokens of 8 KV heads x 64 dims would be 256 MiB a layer if allocated in full.
    const geo: Geometry = { layers: 1, qHeads: 8, kvHeads: 8, headDim: 64, kvDtype: 1 };
    const ret: Retrieval = { ...RET, sinkTokens: 4 * 4096, windowTokens: 2 ** 16, selectTokens: 2 ** 16 };
    const segs = host(geo, ret, 2);
    const e = new addon.Engine({ backend: "cpu", threads: 1 });
    const before = process.memoryUsage().rss;
    const s = e.createSession(geo, ret, { capacityPages: 2, ...segs }, false);
    expect(process.memoryUsage().rss - before).toBeLessThan(64 * 2 ** 20);
    e.closeSession(s);
  });

  it("a getter that closes a segment during createSession gets an error; the engine carries on", async () => {
    const segs = host(GEO, RET, 16);
    const e = new addon.Engine({ backend: "cpu", threads: 1 });
    const h = {
      capacityPages: 16,
      store: segs.store,
      staging: segs.staging,
      tail: segs.tail,
      get manifest() {
        segs.store.close();
        return segs.manifest;
      },
    };
    expect(() => e.createSession(GEO, RET, h as never, false)).toThrow(/host\.store: segment is closed/);
    const ok = host(GEO, RET, 16);
    const s = e.createSession(GEO, RET, { capacityPages: 16, ...ok }, false);
    const n = 16,
      row = GEO.kvHeads * GEO.headDim;
    await e.prefill(s, 0, rng.normals(n * row), rng.normals(n * row), n);
    expect(e.stats(s).pagesOffloaded).toBe(n / RET.pageSize);
    e.closeSession(s);
  });

  it("a getter that closes the segment during allocateAsync gets an error", () => {
    const s = segment(1 << 20);
    const pair = [0, 4096];
    Object.defineProperty(pair, 0, {
      get() {
        s.close();
        return 0;
      },
    });
    expect(() => s.allocateAsync([pair as [number, number]])).toThrow(/segment is closed/);
  });

  it("model threads, shapes and logits past one array are refused before any work", async () => {
    const dir = mkdtempSync(join(tmpdir(), "fkv-bounds-"));
    try {
      const V = 2 ** 20,
        H = 2,
        I = 2;
      const file = join(dir, "w.bin");
      writeFileSync(file, Buffer.from(rng.normals(V * H).buffer));
      const t = (name: string, shape: number[]) => ({ name, file, offset: 0, byteLength: shape.reduce((a, b) => a * b, 1) * 4, dtype: "F32", shape });
      const p = "model.layers.0.";
      const tensors = [
        t("model.embed_tokens.weight", [V, H]), t("model.norm.weight", [H]),
        t(p + "input_layernorm.weight", [H]), t(p + "post_attention_layernorm.weight", [H]),
        t(p + "self_attn.q_proj.weight", [2, H]), t(p + "self_attn.k_proj.weight", [2, H]), t(p + "self_attn.v_proj.weight", [2, H]),
        t(p + "self_attn.o_proj.weight", [H, 2]), t(p + "mlp.gate_proj.weight", [I, H]), t(p + "mlp.up_proj.weight", [I, H]), t(p + "mlp.down_proj.weight", [H, I]),
      ];
      const config = {
        architecture: "llama", vocabSize: V, hiddenSize: H, intermediateSize: I, layers: 1, qHeads: 1, kvHeads: 1, headDim: 2, rmsNormEps: 1e-5,
        ropeTheta: 10000, ropeInvFreq: new Float32Array([1]), tieWordEmbeddings: true, attentionBias: false,
      };
      const Model = addon.Model as unknown as new (o: object) => { prefill(s: number, t: Int32Array, start: number, all: boolean): Promise<Float32Array> };
      expect(() => new Model({ config, tensors, threads: 100_000 })).toThrow(/threads must be an integer in \[0, 1024\]/);
      expect(() => new Model({ config: { ...config, qHeads: 65536, kvHeads: 65536 }, tensors, threads: 1 })).toThrow(/qHeads must be <= 1024/);
      const m = new Model({ config, tensors, threads: 1 });
      expect(() => m.prefill(0, new Int32Array(1025).fill(1), 0, true)).toThrow(/more than one array's 4 GiB/);
      // The same model serves a prompt whose logits fit.
      const logits = await m.prefill(0, Int32Array.from({ length: 3 }, () => rng.int(V)), 0, false);
      expect(logits.length).toBe(V);
      expect(logits.every(Number.isFinite)).toBe(true);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("the classes still work on the main thread after a worker that loaded the addon ended", () => {
    const binding = join(process.cwd(), "dist/native/binding.js");
    const script = `
      import { Worker } from "node:worker_threads";
      import { loadAddon } from ${JSON.stringify(binding)};
      const a = loadAddon();
      const w = new Worker(${JSON.stringify(`import(${JSON.stringify(binding)}).then((m) => { m.loadAddon(); })`)}, { eval: true });
      w.once("exit", () => {
        const name = "/fkv-bounds-worker-" + process.pid;
        const s = a.ShmSegment.create(name, 4096);
        a.ShmSegment.unlink(name);
        const e = new a.Engine({ backend: "cpu", threads: 1 });
        console.log("ok", s.size, typeof e.createSession);
      });`;
    const r = spawnSync(process.execPath, ["--input-type=module", "-e", script], { encoding: "utf8", timeout: 60_000 });
    expect(r.stderr).toBe("");
    expect(r.status).toBe(0);
    expect(r.stdout.trim()).toBe("ok 4096 function");
  });
});
