/**
 * The enum numbers and names of the native contract (native/src/engine/Retrieval.h) against the
 * proto's, the retrieval defaults and validator of both addons, and the manifest functions.
 */
import { describe, expect, it } from "vitest";
import { loadAddon } from "../../native/binding.js";
import { loadShm } from "../../native/shm.js";
import { DType, GroupCombine, RecallMode, RetrievalMode, SummaryKind } from "../../proto/gen/freekv/v1/common.js";
import { RETRIEVAL_NAMES, resolveRetrieval } from "../../services/common/retrieval.js";

/** The proto enum's values by their name without the prefix, lower case (0 and UNRECOGNIZED left out). */
function protoNames(e: Record<string, string | number>, prefix: string): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [k, v] of Object.entries(e)) if (typeof v === "number" && v > 0) out[k.slice(prefix.length).toLowerCase()] = v;
  return out;
}

const PROTO = {
  kvDtype: protoNames(DType, "D_TYPE_"),
  summary: protoNames(SummaryKind, "SUMMARY_KIND_"),
  combine: protoNames(GroupCombine, "GROUP_COMBINE_"),
  mode: protoNames(RetrievalMode, "RETRIEVAL_MODE_"),
  recall: protoNames(RecallMode, "RECALL_MODE_"),
};

describe("contract", () => {
  it("native enum names and numbers equal the proto's and the TypeScript table", () => {
    for (const addon of [loadShm(), loadAddon()]) {
      expect(addon.enums()).toEqual(PROTO);
    }
    expect(RETRIEVAL_NAMES).toEqual(PROTO);
  });

  it("both addons have the same defaults, and the wire's unset config resolves to them", () => {
    const d = loadShm().retrievalDefaults();
    expect(loadAddon().retrievalDefaults()).toEqual(d);
    const r = resolveRetrieval(undefined, 4);
    expect({ ...r, tauSet: undefined }).toEqual({ ...d, tauSet: undefined });
    expect(loadShm().validateRetrieval(d, 1)).toBeNull();
  });

  it("the validator names the first invalid field", () => {
    const v = (r: object, layers = 4) => loadShm().validateRetrieval(r, layers);
    expect(v({ pageSize: 0 })?.field).toBe("pageSize");
    expect(v({ pageSize: 8, sinkTokens: 12 })?.field).toBe("sinkTokens");
    expect(v({ pageSize: 8, windowTokens: 4 })?.field).toBe("windowTokens");
    expect(v({ pageSize: 8, selectTokens: -8 })?.field).toBe("selectTokens");
    expect(v({ tau: Number.NaN })?.field).toBe("tau");
    expect(v({ pageSize: 8, sinkTokens: 2 ** 20 + 8 })?.field).toBe("sinkTokens");
    expect(v({ mode: 7 })?.field).toBe("mode");
    expect(v({ recall: 3 })?.field).toBe("recall");
    expect(v({ denseLayers: [1, 4] })?.field).toBe("denseLayers[1]");
    expect(v({ denseLayers: [2, 2] })).toEqual({ field: "denseLayers[1]", message: "layer 2 listed twice" });
    for (const addon of [loadShm(), loadAddon()]) expect(addon.validateRetrieval({ pageSize: 8, sinkTokens: 12 }, 4)).toEqual(v({ pageSize: 8, sinkTokens: 12 }));
  });

  it("initManifest writes a fresh manifest that readManifest reads back", () => {
    const b = new ArrayBuffer(4096);
    new Uint8Array(b).fill(0xab);
    loadShm().initManifest(b, 3);
    const dv = new DataView(b);
    expect(dv.getUint32(0, true)).toBe(0x31564b46); // "FKV1"
    expect(dv.getUint32(4, true)).toBe(3);
    expect(new Uint8Array(b, 8).every((x) => x === 0)).toBe(true);
    dv.setUint32(16 + 8, 5, true); // layer 1: 5 committed pages, 7 tail tokens
    dv.setUint32(16 + 12, 7, true);
    dv.setBigUint64(8, 167n, true);
    expect(loadAddon().readManifest(b, 3)).toEqual({ valid: true, corrupt: false, layers: 3, contextTokens: 167, committedPages: [0, 5, 0], tailTokens: [0, 7, 0] });
    expect(loadShm().readManifest(b, 2).valid).toBe(false);
    // The kvstore's corrupt marker replaces the magic: not valid, corrupt, and said by manifestCorrupt.
    expect(loadShm().manifestCorrupt(b)).toBe(false);
    loadShm().markManifestCorrupt(b);
    expect(loadAddon().manifestCorrupt(b)).toBe(true);
    expect(loadShm().readManifest(b, 3)).toMatchObject({ valid: false, corrupt: true, contextTokens: 167 });
    expect(() => loadShm().markManifestCorrupt(new ArrayBuffer(8))).toThrow(/no header/);
    expect(() => loadShm().initManifest(new ArrayBuffer(20), 2)).toThrow(/cannot hold 2 layers/);
  });
});
