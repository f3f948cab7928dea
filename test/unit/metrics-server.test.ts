/**
 * The metrics HTTP server: /metrics in Prometheus text, /livez for the liveness probe (200 while
 * the process runs, whatever its dependencies do), 404 otherwise; and the metrics address settings.
 */
import { describe, expect, it } from "vitest";
import { Counter } from "prom-client";
import { createRegistry, startMetricsServer } from "../../services/common/metrics.js";
import { parseConfig } from "../../services/common/config.js";
import { computeConfigSchema } from "../../services/compute/config.js";
import { kvstoreConfigSchema } from "../../services/kvstore/config.js";

describe("metrics server", () => {
  it("serves /metrics and /livez, and 404 for the rest", async () => {
    const registry = createRegistry("test");
    const n = 1 + Math.floor(Math.random() * 1000);
    new Counter({ name: "freekv_test_things_total", help: "things", registers: [registry] }).inc(n);
    const server = await startMetricsServer(registry, 0, "127.0.0.1");
    try {
      const base = `http://127.0.0.1:${server.port}`;
      const m = await fetch(`${base}/metrics`);
      expect(m.status).toBe(200);
      expect(await m.text()).toContain(`freekv_test_things_total{service="test"} ${n}`);
      const l = await fetch(`${base}/livez`);
      expect(l.status).toBe(200);
      expect(await l.text()).toBe("ok\n");
      expect((await fetch(`${base}/healthz`)).status).toBe(404);
      expect((await fetch(`${base}/livez`, { method: "POST" })).status).toBe(404);
    } finally {
      await server.close();
    }
  });

  it("logs a server error once listening (a failed accept) instead of ending the process", async () => {
    const lines: Array<{ msg: string; err: string }> = [];
    const log = { error: (o: { err: string }, msg: string) => lines.push({ ...o, msg }) } as never;
    const server = await startMetricsServer(createRegistry("test"), 0, "127.0.0.1", log);
    try {
      // Without a listener, emit("error") throws: the process's uncaught exception.
      expect(() => server.server.emit("error", new Error("accept EMFILE"))).not.toThrow();
      expect(lines).toEqual([{ err: "accept EMFILE", port: server.port, msg: "metrics server error" }]);
      expect((await fetch(`http://127.0.0.1:${server.port}/livez`)).status).toBe(200);
    } finally {
      await server.close();
    }
  });

  it("takes the metrics address apart from the gRPC address", () => {
    expect(parseConfig(kvstoreConfigSchema, {}).FREEKV_KVSTORE_METRICS_HOST).toBeUndefined();
    expect(parseConfig(kvstoreConfigSchema, { FREEKV_KVSTORE_HOST: "127.0.0.1", FREEKV_KVSTORE_METRICS_HOST: "0.0.0.0" }).FREEKV_KVSTORE_METRICS_HOST).toBe("0.0.0.0");
    expect(parseConfig(computeConfigSchema, { FREEKV_COMPUTE_METRICS_HOST: "::" }).FREEKV_COMPUTE_METRICS_HOST).toBe("::");
    // An empty variable is unset, as everywhere in the configuration.
    expect(parseConfig(computeConfigSchema, { FREEKV_COMPUTE_METRICS_HOST: "" }).FREEKV_COMPUTE_METRICS_HOST).toBeUndefined();
  });
});
