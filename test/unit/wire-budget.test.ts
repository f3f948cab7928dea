/**
 * The count a request is held to before it is decoded (services/common/wire-budget.ts), against
 * what the protobuf wire format says such a message holds: one embedded message per item and
 * tensor, a tag per field and one value per packed element. The limits are exact (a message at
 * the limit passes, one past it does not), and bytes that are not a message never make the scan
 * throw: they are left to the decoder.
 */
import { describe, expect, it } from "vitest";
import { AttentionRequest, ReceiveSessionRequest } from "../../proto/gen/freekv/v1/compute.js";
import { CommitPagesRequest } from "../../proto/gen/freekv/v1/kvstore.js";
import { overBudget, requestMessage } from "../../services/common/wire-budget.js";
import { prng } from "../helpers/prng.js";

const rand = prng(Number(process.env.FREEKV_TEST_SEED ?? 0x3b1d));
const int = (a: number, b: number) => a + Math.floor(rand() * (b - a + 1));
const wide = { maxMessages: 1e9, maxValues: 1e9 };

describe("wire budget", () => {
  it("finds each method's request message", () => {
    expect(requestMessage("/freekv.v1.ComputeService/Attention")?.typeName).toBe("freekv.v1.AttentionRequest");
    expect(requestMessage("/freekv.v1.SessionMoveService/ReceiveSession")?.typeName).toBe("freekv.v1.ReceiveSessionRequest");
    expect(requestMessage("/freekv.v1.KvStoreService/CommitPages")?.typeName).toBe("freekv.v1.CommitPagesRequest");
    expect(requestMessage("/freekv.v1.Nope/Attention")).toBeUndefined();
    expect(requestMessage("not a path")).toBeUndefined();
  });

  it("counts embedded messages exactly: a decode of n items, each with its present tensors", () => {
    const desc = requestMessage("/freekv.v1.ComputeService/Attention")!;
    for (let trial = 0; trial < 20; trial++) {
      const n = int(1, 300);
      let tensors = 0;
      const items = Array.from({ length: n }, () => {
        const item: Record<string, unknown> = { sessionId: `s${int(0, 1e6)}` };
        for (const k of ["q", "k", "v"]) {
          if (rand() < 0.5) continue;
          item[k] = { dtype: 1, shape: [int(1, 64), int(1, 256)], data: new Uint8Array(int(0, 64)).map(() => int(0, 255)) };
          tensors++;
        }
        return item;
      });
      const b = AttentionRequest.encode(AttentionRequest.fromPartial({ requestId: int(1, 1e6), op: { $case: "decode", value: { items } } as never })).finish();
      const messages = 1 + n + tensors; // the decode, its items, their tensors
      expect(overBudget(desc, b, { ...wide, maxMessages: messages })).toBeUndefined();
      expect(overBudget(desc, b, { ...wide, maxMessages: messages - 1 })).toBe(`more than ${messages - 1} embedded messages`);
    }
  });

  it("counts packed values exactly, without decoding them", () => {
    const desc = requestMessage("/freekv.v1.ComputeService/Attention")!;
    for (let trial = 0; trial < 20; trial++) {
      const m = int(1, 5000);
      // Values of every varint length.
      const shape = Array.from({ length: m }, () => Math.floor(2 ** (rand() * 32)) >>> 0);
      const b = AttentionRequest.encode(AttentionRequest.fromPartial({ op: { $case: "decode", value: { items: [{ q: { shape } }] } } as never })).finish();
      // Tags: decode, items, q, shape; then one value per element.
      const values = 4 + m;
      expect(overBudget(desc, b, { ...wide, maxValues: values })).toBeUndefined();
      expect(overBudget(desc, b, { ...wide, maxValues: values - 1 })).toBe(`more than ${values - 1} fields and repeated values`);
    }
    // Fixed-width and repeated messages on the kvstore's side.
    const commit = requestMessage("/freekv.v1.KvStoreService/CommitPages")!;
    const layers = Array.from({ length: int(2, 40) }, (_, layer) => ({ layer, firstPage: int(0, 100), count: 3, checksums: [int(0, 2 ** 32 - 1), int(0, 2 ** 32 - 1), int(0, 2 ** 32 - 1)] }));
    const c = CommitPagesRequest.encode(CommitPagesRequest.fromPartial({ sessionId: "x", layers })).finish();
    expect(overBudget(commit, c, { ...wide, maxMessages: layers.length })).toBeUndefined();
    expect(overBudget(commit, c, { ...wide, maxMessages: layers.length - 1 })).toMatch(/embedded messages/);
  });

  it("never throws on bytes that are not a message; a huge claimed length is the decoder's to reject", () => {
    const descs = ["/freekv.v1.ComputeService/Attention", "/freekv.v1.SessionMoveService/ReceiveSession", "/freekv.v1.KvStoreService/CommitPages"].map((p) => requestMessage(p)!);
    for (let trial = 0; trial < 2000; trial++) {
      const b = new Uint8Array(int(0, 200)).map(() => int(0, 255));
      for (const d of descs) {
        const r = overBudget(d, b, { maxMessages: int(0, 5), maxValues: int(0, 50) });
        if (r !== undefined) expect(r).toMatch(/^more than \d+ (embedded messages|fields and repeated values)$/);
      }
    }
    const header = ReceiveSessionRequest.encode(ReceiveSessionRequest.fromPartial({ item: { $case: "header", value: { sessionId: "x" } } as never })).finish();
    expect(overBudget(descs[1], header, wide)).toBeUndefined();
    expect(overBudget(descs[1], Buffer.from([0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]), wide)).toBeUndefined();
  });
});
