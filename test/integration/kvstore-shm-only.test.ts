/**
 * The kvstore process serves without the compute engine's addon: while it answers an
 * AttachSession, its memory maps hold freekv_shm.node and not freekv.node.
 */
import { readFileSync } from "node:fs";
import { afterAll, describe, expect, it } from "vitest";
import { QUIET, kvstoreClient, startService, unary, type ServiceProcess } from "../helpers/services.js";

let kv: ServiceProcess | undefined;
afterAll(async () => {
  await kv?.stop();
});

describe("kvstore process", () => {
  it("attaches a session with only freekv_shm.node mapped", async () => {
    kv = await startService("kvstore", { env: { ...QUIET, FREEKV_KVSTORE_PORT: "0", FREEKV_KVSTORE_METRICS_PORT: "0" } });
    const client = kvstoreClient(kv.address);
    const res = await unary<{ created: boolean }>(client, "attachSession", { sessionId: "shm-only", geometry: { layers: 2, queryHeads: 4, kvHeads: 2, headDim: 16, kvDtype: 1 }, maxContextTokens: 256 });
    expect(res.created).toBe(true);
    const maps = readFileSync(`/proc/${kv.pid}/maps`, "utf8");
    expect(maps).toMatch(/freekv_shm\.node/);
    expect(maps).not.toMatch(/\/freekv\.node/);
    await unary(client, "releaseSession", { sessionId: "shm-only" });
    client.close();
  });
});
