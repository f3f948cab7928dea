/**
 * Following a dependency's grpc.health.v1 Watch: compute is only as ready as the kvstore it
 * needs for every new session, so its own health follows the kvstore's (and a pod whose kvstore
 * is down leaves load balancing). The watch reconnects with a short backoff.
 */
import { createRequire } from "node:module";
import { dirname } from "node:path";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import type { Logger } from "./log.js";

type HealthClient = grpc.Client & { Watch(req: { service: string }): grpc.ClientReadableStream<{ status: string }> };

export interface UpstreamHealth {
  readonly serving: boolean;
  stop(): void;
}

export function followUpstreamHealth(address: string, service: string, log: Logger, onChange: (serving: boolean) => void, creds: grpc.ChannelCredentials = grpc.credentials.createInsecure()): UpstreamHealth {
  const protoPath = (createRequire(import.meta.url)("grpc-health-check") as { protoPath: string }).protoPath;
  const def = protoLoader.loadSync(protoPath, { includeDirs: [dirname(protoPath)], enums: String, defaults: true });
  const Health = (grpc.loadPackageDefinition(def) as unknown as { grpc: { health: { v1: { Health: new (a: string, c: grpc.ChannelCredentials) => HealthClient } } } }).grpc.health.v1.Health;
  const client = new Health(address, creds);
  let serving = true;
  let stopped = false;
  let call: grpc.ClientReadableStream<{ status: string }> | undefined;
  let timer: NodeJS.Timeout | undefined;

  const set = (s: boolean, why: string) => {
    if (s === serving) return;
    serving = s;
    log[s ? "info" : "warn"]({ upstream: address, service, why }, s ? "upstream serving" : "upstream not serving");
    onChange(s);
  };
  const watch = () => {
    if (stopped) return;
    call = client.Watch({ service });
    const retry = (why: string) => {
      if (stopped) return;
      set(false, why);
      const c = call;
      call = undefined;
      c?.removeAllListeners();
      c?.on("error", () => undefined);
      c?.cancel();
      timer = setTimeout(watch, 500);
      timer.unref();
    };
    call.on("data", (m: { status: string }) => {
      // A draining upstream waits for calls in flight: let go of the watch so it can stop.
      if (m.status === "SERVING") set(true, m.status);
      else retry(m.status);
    });
    call.on("error", (e: grpc.ServiceError) => retry(e.details || e.message));
    call.on("end", () => retry("watch ended"));
  };
  watch();
  return {
    get serving() {
      return serving;
    },
    stop() {
      stopped = true;
      if (timer) clearTimeout(timer);
      call?.cancel();
      client.close();
    },
  };
}
