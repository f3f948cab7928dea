/** FREEKV_DRAIN_HANDOFF: the setting's form, and the peers a draining compute hands sessions to. */
import { describe, expect, it } from "vitest";
import { computeConfigSchema } from "../../services/compute/config.js";
import { handoffPeers } from "../../services/compute/sessions/handoff.js";

describe("drain hand-off peers", () => {
  it("takes host:port lists and refuses anything else", () => {
    for (const ok of ["owners", "10.0.0.1:50051", "a:1, b.example:65535", " pod-0.freekv:50051 ,pod-1.freekv:50051 "]) {
      expect(computeConfigSchema.safeParse({ FREEKV_DRAIN_HANDOFF: ok }).success, ok).toBe(true);
    }
    for (const bad of ["", "host", "host:", ":50051", "a:1,,b:2", "a:1;b:2", "a b:1", "http://a:1", "owners,a:1", "Owners"]) {
      expect(computeConfigSchema.safeParse({ FREEKV_DRAIN_HANDOFF: bad }).success, bad).toBe(false);
    }
  });

  it("lists each peer once, in order, without this pod", () => {
    expect(handoffPeers(undefined, "a:1")).toEqual([]);
    expect(handoffPeers("owners", "a:1")).toEqual([]);
    expect(handoffPeers(" b:2, a:1 ,c:3,b:2", "a:1")).toEqual(["b:2", "c:3"]);
    expect(handoffPeers("a:1", "a:1")).toEqual([]);
    expect(handoffPeers("a:1,b:2", undefined)).toEqual(["a:1", "b:2"]);
  });
});
