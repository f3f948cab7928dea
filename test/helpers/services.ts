/**
 * Test access to the two tiers as real processes (started through tools/dev/launch.ts on
 * ephemeral ports) and small promise wrappers for their gRPC clients.
 */
import { readdirSync } from "node:fs";
import { connect } from "node:net";
import type { Registry } from "prom-client";
import { credentials, Metadata, type Client, type ServiceError } from "@grpc/grpc-js";
import * as computeMessages from "../../proto/gen/freekv/v1/compute.js";
import * as kvstoreMessages from "../../proto/gen/freekv/v1/kvstore.js";
import { ComputeServiceClient } from "../../proto/gen/freekv/v1/compute.js";
import { KvStoreServiceClient } from "../../proto/gen/freekv/v1/kvstore.js";

/** `<Method>Request.fromPartial`, so tests can pass partial messages (ts-proto encodes full ones). */
function fromPartial(method: string, req: unknown): unknown {
  const name = `${method[0].toUpperCase()}${method.slice(1)}Request`;
  const fns = ((computeMessages as Record<string, unknown>)[name] ?? (kvstoreMessages as Record<string, unknown>)[name]) as { fromPartial(o: unknown): unknown } | undefined;
  return fns ? fns.fromPartial(req ?? {}) : req;
}
import { startService, startTiers, type ServiceProcess, type Tiers } from "../../tools/dev/launch.js";

export { startService, startTiers, type ServiceProcess, type Tiers };

/** Quiet logs and a short drain unless a test says otherwise. */
export const QUIET = { FREEKV_LOG_LEVEL: "warn", FREEKV_SHUTDOWN_GRACE_MS: "3000" };

export function computeClient(address: string): ComputeServiceClient {
  return new ComputeServiceClient(address, credentials.createInsecure());
}

export function kvstoreClient(address: string): KvStoreServiceClient {
  return new KvStoreServiceClient(address, credentials.createInsecure());
}

/** Calls a unary method of a generated client and resolves with its response. */
export function unary<Res>(client: Client, method: string, req: unknown, deadlineMs = 10_000): Promise<Res> {
  return new Promise((resolve, reject) => {
    const fn = (client as unknown as Record<string, (...a: unknown[]) => unknown>)[method];
    fn.call(client, fromPartial(method, req), new Metadata(), { deadline: Date.now() + deadlineMs }, (err: ServiceError | null, res: Res) => (err ? reject(err) : resolve(res)));
  });
}

/** Resolves with the gRPC error of a call expected to fail. */
export async function unaryError(client: Client, method: string, req: unknown): Promise<ServiceError> {
  try {
    await unary(client, method, req);
  } catch (e) {
    return e as ServiceError;
  }
  throw new Error(`${method} succeeded but was expected to fail`);
}

/** Names of our segments now in /dev/shm (with the leading slash, as the services report them). */
export function shmSegments(): Set<string> {
  return new Set(
    readdirSync("/dev/shm")
      .filter((f) => f.startsWith("freekv-"))
      .map((f) => `/${f}`),
  );
}

export async function fetchMetrics(port: number): Promise<string> {
  const r = await fetch(`http://127.0.0.1:${port}/metrics`);
  if (!r.ok) throw new Error(`/metrics: HTTP ${r.status}`);
  return r.text();
}

/** Value of a metric line (`name{labels} value`) or undefined. */
export function metricValue(text: string, name: string, labels = ""): number | undefined {
  for (const line of text.split("\n")) {
    if (line.startsWith("#")) continue;
    const [key, value] = line.split(" ");
    const bare = key.replace(/\{.*\}$/, "");
    if (bare !== name) continue;
    if (labels && !key.includes(labels)) continue;
    return Number(value);
  }
  return undefined;
}

/** A metric's value from an in-process prom-client registry: its series matching `labels`, summed. */
export async function registryValue(reg: Registry, name: string, labels: Record<string, string> = {}): Promise<number> {
  const m = reg.getSingleMetric(name);
  if (!m) throw new Error(`no metric ${name}`);
  const { values } = await m.get();
  return values.filter((v) => Object.entries(labels).every(([k, x]) => v.labels[k] === x)).reduce((a, v) => a + v.value, 0);
}

export const ATTENTION = 2; // SessionKind.SESSION_KIND_ATTENTION

/** Whether a Redis answers PING at 127.0.0.1:`port` (the tests that need one are skipped otherwise). */
export function redisUp(port = 6379): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(port, "127.0.0.1");
    s.setTimeout(1000);
    s.once("connect", () => s.write("PING\r\n"));
    s.once("data", (d) => {
      resolve(String(d).startsWith("+PONG"));
      s.destroy();
    });
    s.once("error", () => resolve(false));
    s.once("timeout", () => {
      resolve(false);
      s.destroy();
    });
  });
}

/** The session ids the kvstore at `address` holds (ListSessions). */
export async function kvstoreSessions(address: string): Promise<string[]> {
  const c = kvstoreClient(address);
  try {
    return (await unary<{ sessionIds: string[] }>(c, "listSessions", {})).sessionIds;
  } finally {
    c.close();
  }
}
