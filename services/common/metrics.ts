/**
 * Prometheus metrics: one registry per process with the default process metrics, served at
 * GET /metrics on its own HTTP port (0 = ephemeral, for tests), separate from the gRPC port so
 * scraping never competes with traffic. The same server answers GET /livez with 200 while the
 * process's event loop runs: a liveness probe that fails only for the process's own fault (the
 * gRPC health also reflects dependencies, such as compute's kvstore, and belongs to readiness).
 */
import type { Logger } from "./log.js";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { Registry, collectDefaultMetrics } from "prom-client";

export function createRegistry(service: string): Registry {
  const registry = new Registry();
  registry.setDefaultLabels({ service });
  collectDefaultMetrics({ register: registry, prefix: "freekv_" });
  return registry;
}

export interface MetricsServer {
  readonly port: number;
  /** The HTTP server (its errors once listening are logged, never thrown). */
  readonly server: Server;
  close(): Promise<void>;
}

export async function startMetricsServer(registry: Registry, port: number, host = "0.0.0.0", log?: Logger): Promise<MetricsServer> {
  const server: Server = createServer((req, res) => {
    if (req.method === "GET" && (req.url === "/metrics" || req.url?.startsWith("/metrics?"))) {
      registry
        .metrics()
        .then((body) => {
          res.writeHead(200, { "content-type": registry.contentType });
          res.end(body);
        })
        .catch((e: unknown) => {
          res.writeHead(500, { "content-type": "text/plain" });
          res.end(String(e));
        });
      return;
    }
    if (req.method === "GET" && req.url === "/livez") {
      res.writeHead(200, { "content-type": "text/plain" });
      res.end("ok\n");
      return;
    }
    res.writeHead(404, { "content-type": "text/plain" });
    res.end("not found: try /metrics or /livez\n");
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, () => {
      server.removeListener("error", reject);
      resolve();
    });
  });
  const actual = (server.address() as AddressInfo).port;
  // Once listening, a server error (a failed accept: out of file descriptors) is logged; without
  // a listener it would end the process.
  server.on("error", (e) => log?.error({ err: e.message, port: actual }, "metrics server error"));
  return {
    port: actual,
    server,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections?.();
        server.close(() => resolve());
      }),
  };
}
