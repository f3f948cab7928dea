/**
 * The deployment: the Kubernetes manifests, rendered offline with `kubectl kustomize` for both
 * overlays (deploy/k8s/overlays/{gpu,cpu}; skipped, saying so, where kubectl is not installed),
 * the gateway example (deploy/gateway/envoy.yaml) and the image (deploy/Dockerfile):
 * - every object validates against the Kubernetes schemas (kubernetes-models' validators);
 * - every pod template meets the Pod Security "restricted" profile (non-root, no privilege
 *   escalation, all capabilities dropped, RuntimeDefault seccomp, no host namespaces or host
 *   paths, only the allowed volume types) and has a read-only root filesystem;
 * - each container's environment (the image's, the ConfigMap's and its own) passes the service's
 *   own configuration schema, names no variable neither service reads, and agrees with the ports
 *   and probes;
 * - the sizing rules of freekv.yaml hold: /dev/shm holds the kvstore's capacity plus the tensor
 *   exchanges (set explicitly); each memory limit covers the container's own working set plus the
 *   /dev/shm pages it may be charged for (with cuda compute commits session pages itself, so its
 *   limit covers the capacity too); the requests equal the limits, except that with cuda the
 *   capacity is requested once (by compute), and they add up to everything the pod can hold;
 * - terminationGracePeriodSeconds covers compute's preStop delay, both drains and the hand-off
 *   (the services' own defaults where the ConfigMap leaves them);
 * - compute authenticates every call from a mounted Secret (example in
 *   deploy/k8s/auth-secret.example.yaml), and the NetworkPolicies open compute's gRPC to the
 *   gateway, the pods and labelled clients only, with egress only to the pods, Redis and DNS;
 * - the gateway routes the public service only, retries only requests that never reached a pod,
 *   and sets a stream idle timeout, circuit breakers sized to the pods' queues and health checks;
 * - the image is built on the CUDA major whose cuBLASLt the addon opens, and checks its runtime
 *   libraries in the runtime stage.
 */
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { parseAllDocuments } from "yaml";
import * as models from "kubernetes-models";
import { parseConfig } from "../../services/common/config.js";
import { computeConfigSchema } from "../../services/compute/config.js";
import { SETTLE_MS } from "../../services/compute/sessions/move.js";
import { kvstoreConfigSchema } from "../../services/kvstore/config.js";

const ROOT = join(import.meta.dirname, "..", "..");
let kubectl = true;
try {
  execFileSync("kubectl", ["version", "--client"], { stdio: "ignore" });
} catch {
  kubectl = false;
}

type Obj = { apiVersion: string; kind: string; metadata: { name: string; labels?: Record<string, string> }; [k: string]: unknown };
// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Any = any;

function render(overlay: string): Obj[] {
  const text = execFileSync("kubectl", ["kustomize", join(ROOT, "deploy", "k8s", "overlays", overlay)], { encoding: "utf8" });
  return parseAllDocuments(text).map((d) => d.toJSON() as Obj).filter(Boolean);
}

/** The kubernetes-models class of an object (e.g. apps/v1 Deployment -> models["apps"]... ), or undefined. */
function modelClass(o: Obj): (new (x: unknown) => { validate(): void }) | undefined {
  const [group, version] = o.apiVersion.includes("/") ? o.apiVersion.split("/") : ["", o.apiVersion];
  const ns = group === "" ? (models as Any)[version] : (models as Any)[groupKey(group)]?.[version];
  return ns?.[o.kind];
}
/** kubernetes-models' export names for API groups: "apps", "networking.k8s.io" -> "networkingK8sIo". */
function groupKey(group: string): string {
  return group
    .split(/[.-]/)
    .map((p, i) => (i === 0 ? p : p[0].toUpperCase() + p.slice(1)))
    .join("");
}

const rendered = (objs: Obj[]): Set<string> => new Set(objs.map((o) => `${o.kind}/${o.metadata.name}`));

const bytes = (q: string): number => {
  const m = /^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti)?$/.exec(q);
  if (!m) throw new Error(`quantity ${q}`);
  return Number(m[1]) * { "": 1, Ki: 2 ** 10, Mi: 2 ** 20, Gi: 2 ** 30, Ti: 2 ** 40 }[m[2] ?? ""]!;
};

/** A duration of Envoy's configuration ("3600s", "0.5s") in seconds. */
const seconds = (d: string): number => {
  const m = /^(\d+(?:\.\d+)?)s$/.exec(d);
  if (!m) throw new Error(`duration ${d}`);
  return Number(m[1]);
};

/** The runtime stage's ENV of deploy/Dockerfile (after its last FROM). */
function imageEnv(): Record<string, string> {
  const text = readFileSync(join(ROOT, "deploy", "Dockerfile"), "utf8").replace(/\\\n/g, " ");
  const runtime = text.slice(text.lastIndexOf("\nFROM ") + 1);
  const env: Record<string, string> = {};
  for (const line of runtime.split("\n").filter((l) => l.startsWith("ENV ")))
    for (const m of line.slice(4).matchAll(/(\w+)=(\S+)/g)) env[m[1]] = m[2];
  return env;
}

/**
 * What a container's process sees: the image's ENV, its envFrom ConfigMap, then its env in order
 * with $(VAR) references expanded; field and secret references get stand-in values.
 */
function containerEnv(c: Any, configMap: Record<string, string>): Record<string, string> {
  const env: Record<string, string> = { ...imageEnv(), ...configMap };
  const fields: Record<string, string> = { "metadata.name": "freekv-7d9f-abcde", "status.podIP": "10.1.2.3" };
  for (const e of c.env ?? []) {
    if (e.value !== undefined) env[e.name] = String(e.value).replace(/\$\((\w+)\)/g, (ref: string, k: string) => env[k] ?? ref);
    else if (e.valueFrom?.fieldRef) env[e.name] = fields[e.valueFrom.fieldRef.fieldPath] ?? "x";
    else if (e.valueFrom?.secretKeyRef) env[e.name] = "0123abcd";
  }
  return env;
}

describe.skipIf(!kubectl)("Kubernetes manifests (kubectl kustomize, offline)", () => {
  for (const overlay of ["gpu", "cpu"]) {
    describe(`overlay ${overlay}`, () => {
      const objs = render(overlay);

      it("renders the whole service, and every object validates against the Kubernetes schemas", () => {
        const kinds = objs.map((o) => `${o.kind}/${o.metadata.name}`).sort();
        for (const want of ["Namespace/freekv", "ConfigMap/freekv-config", "Deployment/freekv", "Deployment/freekv-redis", "Service/freekv", "Service/freekv-redis", "Service/freekv-pods", "PodDisruptionBudget/freekv", "NetworkPolicy/freekv", "NetworkPolicy/freekv-redis", "PersistentVolumeClaim/freekv-models", "PersistentVolumeClaim/freekv-redis-data"])
          expect(kinds).toContain(want);
        for (const o of objs) {
          const Cls = modelClass(o);
          expect(Cls, `a schema for ${o.apiVersion} ${o.kind}`).toBeDefined();
          expect(() => new Cls!(o).validate(), `${o.kind}/${o.metadata.name}`).not.toThrow();
        }
      });

      it("meets the restricted Pod Security profile, with read-only root filesystems", () => {
        const ns = objs.find((o) => o.kind === "Namespace")!;
        expect(ns.metadata.labels?.["pod-security.kubernetes.io/enforce"]).toBe("restricted");
        for (const d of objs.filter((o) => o.kind === "Deployment") as Any[]) {
          const spec = d.spec.template.spec;
          const where = `Deployment/${d.metadata.name}`;
          expect(spec.hostNetwork ?? false, where).toBe(false);
          expect(spec.hostPID ?? false, where).toBe(false);
          expect(spec.hostIPC ?? false, where).toBe(false);
          for (const v of spec.volumes ?? [])
            expect(["emptyDir", "persistentVolumeClaim", "configMap", "secret", "projected", "downwardAPI"].some((k) => k in v), `${where} volume ${v.name}`).toBe(true);
          const podSc = spec.securityContext ?? {};
          for (const c of [...(spec.initContainers ?? []), ...spec.containers]) {
            const sc = c.securityContext ?? {};
            const at = `${where} container ${c.name}`;
            expect(sc.runAsNonRoot ?? podSc.runAsNonRoot, at).toBe(true);
            expect(sc.runAsUser ?? podSc.runAsUser, at).not.toBe(0);
            expect(sc.allowPrivilegeEscalation, at).toBe(false);
            expect(sc.privileged ?? false, at).toBe(false);
            expect(sc.capabilities?.drop, at).toContain("ALL");
            expect(sc.capabilities?.add ?? [], at).toEqual([]);
            expect((sc.seccompProfile ?? podSc.seccompProfile)?.type, at).toBe("RuntimeDefault");
            expect(sc.readOnlyRootFilesystem, at).toBe(true);
            for (const p of c.ports ?? []) expect(p.hostPort, at).toBeUndefined();
          }
        }
      });

      const cfgOf = () => (objs.find((o) => o.kind === "ConfigMap" && o.metadata.name === "freekv-config") as Any).data as Record<string, string>;
      const podOf = () => (objs.find((o) => o.kind === "Deployment" && o.metadata.name === "freekv") as Any).spec.template.spec;
      /** The sizes of freekv.yaml's memory model; `cuda`: compute commits the session pages it writes (caller_commits). */
      const sizing = () => {
        const cfg = cfgOf();
        const pod = podOf();
        const compute = pod.containers.find((c: Any) => c.name === "compute");
        const kv = pod.initContainers.find((c: Any) => c.name === "kvstore");
        return {
          cfg,
          compute,
          kv,
          cuda: cfg.FREEKV_BACKEND === "cuda",
          shm: bytes(pod.volumes.find((v: Any) => v.name === "shm").emptyDir.sizeLimit),
          capacity: Number(cfg.FREEKV_KVSTORE_CAPACITY_BYTES),
          exchanges: Number(cfg.FREEKV_EXCHANGE_CAPACITY_BYTES),
        };
      };

      it("sizes /dev/shm to the capacity plus the exchanges, and each memory limit to its working set plus the /dev/shm pages it may be charged for", () => {
        const { cfg, compute, kv, cuda, shm, capacity, exchanges } = sizing();
        expect(capacity).toBeGreaterThan(0);
        expect(exchanges, "FREEKV_EXCHANGE_CAPACITY_BYTES set (its default is 1/8 of /dev/shm, whatever the capacity leaves)").toBeGreaterThan(0);
        expect(capacity + exchanges, "the capacity and the exchanges fit /dev/shm").toBeLessThanOrEqual(shm);
        // With cuda, compute commits the session pages it writes (MADV_POPULATE_WRITE) while the
        // kvstore's fallocate runs in the background: a page is charged to whichever touches it
        // first, so both limits hold the whole capacity. With cpu the kvstore commits them all.
        const computeShm = exchanges + (cuda ? capacity : 0);
        expect(bytes(compute.resources.limits.memory) - computeShm, "compute's own working set beside the /dev/shm it may be charged for").toBeGreaterThanOrEqual(2 ** 32);
        expect(bytes(kv.resources.limits.memory) - capacity, "the kvstore's own working set beside its capacity").toBeGreaterThanOrEqual(2 ** 30);
        expect(cfg.FREEKV_BACKEND).toBe(overlay === "gpu" ? "cuda" : "cpu");
        if (overlay === "gpu") expect(compute.resources.limits["nvidia.com/gpu"]).toBe(1);
        else expect(compute.resources.limits["nvidia.com/gpu"]).toBeUndefined();
      });

      it("requests the memory it may use: requests equal limits (with cuda the capacity once, in compute's), adding up to everything the pod can hold", () => {
        const { compute, kv, cuda, shm, capacity, exchanges } = sizing();
        const req = (c: Any) => bytes(c.resources.requests.memory);
        const lim = (c: Any) => bytes(c.resources.limits.memory);
        expect(req(compute), "compute's request").toBe(lim(compute));
        expect(req(kv), "the kvstore's request (with cuda, its limit less the capacity compute's request holds)").toBe(lim(kv) - (cuda ? capacity : 0));
        const ownCompute = lim(compute) - exchanges - (cuda ? capacity : 0);
        const ownKv = lim(kv) - capacity;
        expect(req(compute) + req(kv), "both working sets plus /dev/shm").toBeGreaterThanOrEqual(ownCompute + ownKv + shm);
      });

      it("passes each container's environment through its service's configuration schema, and agrees with the ports and probes", () => {
        const cfg = cfgOf();
        const pod = podOf();
        const kv = pod.initContainers.find((c: Any) => c.name === "kvstore");
        const compute = pod.containers.find((c: Any) => c.name === "compute");
        const kvEnv = containerEnv(kv, cfg);
        const computeEnv = containerEnv(compute, cfg);
        const k = parseConfig(kvstoreConfigSchema, kvEnv);
        const c = parseConfig(computeConfigSchema, computeEnv);
        // Every FREEKV_ variable the manifests set is read by a service, or used in another's value.
        const read = new Set([...Object.keys(kvstoreConfigSchema.shape), ...Object.keys(computeConfigSchema.shape)]);
        const referenced = new Set([...JSON.stringify([kv.env, compute.env]).matchAll(/\$\((\w+)\)/g)].map((m) => m[1]));
        for (const name of [...Object.keys(cfg), ...[...(kv.env ?? []), ...(compute.env ?? [])].map((e: Any) => e.name as string)])
          if (name.startsWith("FREEKV_")) expect(read.has(name) || referenced.has(name), `${name} is read by no service`).toBe(true);
        expect(c.FREEKV_EXCHANGE_CAPACITY_BYTES, "FREEKV_EXCHANGE_CAPACITY_BYTES").toBe(Number(cfg.FREEKV_EXCHANGE_CAPACITY_BYTES));
        expect(k.FREEKV_KVSTORE_CAPACITY_BYTES).toBe(Number(cfg.FREEKV_KVSTORE_CAPACITY_BYTES));
        const port = (x: Any, name: string) => x.ports.find((p: Any) => p.name === name)?.containerPort;
        expect(port(compute, "grpc")).toBe(c.FREEKV_COMPUTE_PORT);
        expect(port(compute, "metrics")).toBe(c.FREEKV_COMPUTE_METRICS_PORT);
        expect(compute.readinessProbe.grpc.port).toBe(c.FREEKV_COMPUTE_PORT);
        expect(compute.startupProbe.grpc.port).toBe(c.FREEKV_COMPUTE_PORT);
        expect(port(kv, "kvstore-metrics")).toBe(k.FREEKV_KVSTORE_METRICS_PORT);
        expect(c.FREEKV_KVSTORE_ADDR).toBe(`127.0.0.1:${k.FREEKV_KVSTORE_PORT}`);
        for (const p of [kv.startupProbe, kv.readinessProbe]) expect(p.exec.command).toContain(c.FREEKV_KVSTORE_ADDR);
        // Checked by compute's main() rather than the schema.
        if (c.FREEKV_DRAIN_HANDOFF === "owners") expect(c.FREEKV_SESSION_OWNERS && c.FREEKV_ADVERTISE_ADDRESS, "hand-off to the owners needs them").toBeTruthy();
      });

      it("gives the pod time for compute's preStop delay, both drains and the hand-off", () => {
        const cfg = cfgOf();
        const pod = podOf();
        const kv = pod.initContainers.find((c: Any) => c.name === "kvstore");
        const compute = pod.containers.find((c: Any) => c.name === "compute");
        const c = parseConfig(computeConfigSchema, containerEnv(compute, cfg));
        const k = parseConfig(kvstoreConfigSchema, containerEnv(kv, cfg));
        // The listener closes at SIGTERM: the endpoint's removal must reach the gateways first.
        const cmd: string[] = compute.lifecycle?.preStop?.exec?.command ?? [];
        const sleep = cmd[0] === "sleep" ? Number(cmd[1]) * 1000 : Number(/setTimeout\([^,]+,\s*(\d+)\)/.exec(cmd.join(" "))?.[1]);
        expect(sleep, `compute's preStop delay (${JSON.stringify(cmd)})`).toBeGreaterThanOrEqual(5_000);
        // Compute: preStop, in-flight calls, the hand-off, a lost move answer's settling, and 5 s
        // for flushing responses and cancelled calls; then the kvstore (a sidecar) drains.
        const need = sleep + c.FREEKV_SHUTDOWN_GRACE_MS + (c.FREEKV_DRAIN_HANDOFF ? c.FREEKV_DRAIN_HANDOFF_TIMEOUT_MS + SETTLE_MS : 0) + 5_000 + k.FREEKV_SHUTDOWN_GRACE_MS;
        expect(pod.terminationGracePeriodSeconds * 1000).toBeGreaterThanOrEqual(need);
      });

      it("authenticates every call to compute with tokens from a mounted Secret, and keeps the network to what the pods need", () => {
        const cfg = cfgOf();
        const pod = podOf();
        const compute = pod.containers.find((c: Any) => c.name === "compute");
        const c = parseConfig(computeConfigSchema, containerEnv(compute, cfg));
        const secretOf = (file: string | undefined) => {
          const m = compute.volumeMounts.find((vm: Any) => file?.startsWith(`${vm.mountPath}/`));
          const v = m && pod.volumes.find((x: Any) => x.name === m.name);
          return v?.secret ? { secret: v.secret.secretName as string, key: file!.slice(m.mountPath.length + 1), readOnly: m.readOnly } : undefined;
        };
        const tokens = secretOf(c.FREEKV_AUTH_TOKENS_FILE);
        const peer = secretOf(c.FREEKV_PEER_TOKEN_FILE);
        expect(tokens, `FREEKV_AUTH_TOKENS_FILE=${c.FREEKV_AUTH_TOKENS_FILE} in a mounted Secret`).toBeDefined();
        expect(peer, `FREEKV_PEER_TOKEN_FILE=${c.FREEKV_PEER_TOKEN_FILE} in a mounted Secret`).toBeDefined();
        expect(tokens!.readOnly && peer!.readOnly).toBe(true);
        expect(c.FREEKV_MOVE_ADMIN_TENANT, "the pods' own tenant for hand-offs").toBeTruthy();
        // The example Secret: the keys the settings name, and the admin tenant among the tenants.
        const example = parseAllDocuments(readFileSync(join(ROOT, "deploy", "k8s", "auth-secret.example.yaml"), "utf8"))[0].toJSON() as Any;
        expect(example.kind).toBe("Secret");
        expect(example.metadata.name).toBe(tokens!.secret);
        expect(Object.keys(example.stringData)).toEqual(expect.arrayContaining([tokens!.key, peer!.key]));
        expect(Object.keys(JSON.parse(example.stringData[tokens!.key]))).toContain(c.FREEKV_MOVE_ADMIN_TENANT);
        expect(rendered(objs).has(`Secret/${tokens!.secret}`), "the example is not applied with the overlay").toBe(false);

        const policy = objs.find((o) => o.kind === "NetworkPolicy" && o.metadata.name === "freekv") as Any;
        expect(policy.spec.policyTypes).toEqual(expect.arrayContaining(["Ingress", "Egress"]));
        for (const rule of policy.spec.ingress) {
          expect(rule.from?.length, "every ingress rule names its sources").toBeGreaterThan(0);
          for (const from of rule.from) expect(from.ipBlock, "no address ranges").toBeUndefined();
        }
        const grpcFrom = policy.spec.ingress.filter((r: Any) => r.ports.some((p: Any) => p.port === "grpc")).flatMap((r: Any) => r.from);
        expect(grpcFrom.map((f: Any) => f.podSelector?.matchLabels)).toEqual(expect.arrayContaining([{ "app.kubernetes.io/name": "freekv-gateway" }, { "app.kubernetes.io/name": "freekv" }]));
        for (const f of grpcFrom) expect(f.podSelector?.matchLabels, "gRPC sources are selected pods").toBeDefined();
        // Egress: the freekv pods' gRPC, Redis, and DNS; nothing else.
        const allowed = (r: Any) =>
          r.to
            ? r.to.every((t: Any) => ["freekv", "freekv-redis"].includes(t.podSelector?.matchLabels?.["app.kubernetes.io/name"]) && !t.namespaceSelector && !t.ipBlock)
            : r.ports?.length > 0 && r.ports.every((p: Any) => p.port === 53);
        expect(policy.spec.egress?.length).toBeGreaterThan(0);
        for (const r of policy.spec.egress) expect(allowed(r), JSON.stringify(r)).toBe(true);
      });

      it("probes each process's own liveness, keeps the kvstore's gRPC on the loopback, and defines what it references", () => {
        const pod = (objs.find((o) => o.kind === "Deployment" && o.metadata.name === "freekv") as Any).spec.template.spec;
        const kv = pod.initContainers.find((c: Any) => c.name === "kvstore");
        const compute = pod.containers.find((c: Any) => c.name === "compute");
        expect(kv.restartPolicy).toBe("Always");
        for (const c of [kv, compute]) expect(c.livenessProbe.httpGet.path).toBe("/livez");
        const env = (c: Any, k: string) => c.env?.find((e: Any) => e.name === k)?.value;
        expect(env(kv, "FREEKV_KVSTORE_HOST")).toBe("127.0.0.1");
        expect(kv.ports.map((p: Any) => p.containerPort)).not.toContain(50052);
        expect(env(kv, "FREEKV_DIRECTORY")).toMatch(/^redis:\/\/:\$\(FREEKV_REDIS_PASSWORD\)@/);
        const names = rendered(objs);
        for (const v of pod.volumes) if (v.persistentVolumeClaim) expect(names.has(`PersistentVolumeClaim/${v.persistentVolumeClaim.claimName}`), v.name).toBe(true);
        for (const c of [kv, compute]) for (const f of c.envFrom ?? []) expect(names.has(`ConfigMap/${f.configMapRef.name}`)).toBe(true);
        // The secrets the operator creates (kustomization.yaml, auth-secret.example.yaml).
        const secrets = [...JSON.stringify(objs).matchAll(/"secretKeyRef":\{[^}]*"name":"([^"]+)"/g)].map((m) => m[1]);
        expect(secrets.length).toBeGreaterThanOrEqual(2);
        expect(new Set(secrets)).toEqual(new Set(["freekv-redis-auth"]));
        expect(pod.volumes.filter((v: Any) => v.secret).map((v: Any) => v.secret.secretName)).toEqual(["freekv-auth"]);
      });
    });
  }

  it("the gateway example hashes on the session header over the headless Service of the pods", () => {
    const envoy = parseAllDocuments(readFileSync(join(ROOT, "deploy", "gateway", "envoy.yaml"), "utf8"))[0].toJSON() as Any;
    const routes = envoy.static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[0].routes;
    for (const r of routes) expect(r.route.hash_policy[0].header.header_name).toBe("x-freekv-session-id");
    const cluster = envoy.static_resources.clusters[0];
    expect(cluster.lb_policy).toBe("RING_HASH");
    const addr = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address;
    expect(addr.address).toBe("freekv-pods.freekv.svc.cluster.local");
    const pods = render("gpu").find((o) => o.kind === "Service" && o.metadata.name === "freekv-pods") as Any;
    expect(pods.spec.clusterIP).toBe("None");
    expect(pods.spec.ports[0].port).toBe(addr.port_value);
  });

  it("the gateway routes the public service only, retries only calls that never reached a pod, and is sized for long streams and the pods' queues", () => {
    const envoy = parseAllDocuments(readFileSync(join(ROOT, "deploy", "gateway", "envoy.yaml"), "utf8"))[0].toJSON() as Any;
    const hcm = envoy.static_resources.listeners[0].filter_chains[0].filters[0].typed_config;
    const routes = hcm.route_config.virtual_hosts.flatMap((v: Any) => v.routes);
    // The public service of proto/freekv/v1/compute.proto; moves, reflection and health stay inside.
    const proto = readFileSync(join(ROOT, "proto", "freekv", "v1", "compute.proto"), "utf8");
    expect(proto).toMatch(/^service ComputeService \{/m);
    const routed = (path: string) => routes.some((r: Any) => (r.match.prefix !== undefined ? path.startsWith(r.match.prefix) : r.match.path === path));
    expect(routes.length).toBeGreaterThan(0);
    for (const r of routes) expect(r.match.prefix ?? r.match.path, "routes name the public service").toMatch(/^\/freekv\.v1\.ComputeService\//);
    expect(routed("/freekv.v1.ComputeService/Generate")).toBe(true);
    for (const internal of ["/freekv.v1.SessionMoveService/MoveSession", "/freekv.v1.SessionMoveService/ReceiveSession", "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "/grpc.health.v1.Health/Check", "/freekv.v1.KvStoreService/ReleaseSession"])
      expect(routed(internal), internal).toBe(false);
    for (const r of routes) {
      const retry = r.route.retry_policy;
      expect(retry, "retries of calls that never reached a pod (a draining pod's closed listener)").toBeDefined();
      for (const on of retry.retry_on.split(",")) expect(["connect-failure", "refused-stream", "reset-before-request"], on).toContain(on.trim());
      expect(retry.num_retries).toBeGreaterThanOrEqual(1);
    }
    // Generations queue and prefill for minutes before their first message.
    expect(hcm.stream_idle_timeout, "stream_idle_timeout (Envoy's default of 5 min resets waiting streams)").toBeDefined();
    const idle = seconds(hcm.stream_idle_timeout);
    expect(idle === 0 || idle >= 1800, `stream_idle_timeout ${hcm.stream_idle_timeout}`).toBe(true);
    expect(hcm.use_remote_address).toBe(true);
    // Circuit breakers: what the pods would take (running + queued requests on every replica).
    const objs = render("gpu");
    const cfg = (objs.find((o) => o.kind === "ConfigMap" && o.metadata.name === "freekv-config") as Any).data;
    const deployment = objs.find((o) => o.kind === "Deployment" && o.metadata.name === "freekv") as Any;
    const c = parseConfig(computeConfigSchema, cfg);
    const perPod = c.FREEKV_MAX_RUNNING_REQUESTS + c.FREEKV_QUEUE_MAX_REQUESTS;
    const cluster = envoy.static_resources.clusters[0];
    const t = cluster.circuit_breakers?.thresholds?.[0];
    expect(t, "circuit breakers").toBeDefined();
    expect(t.max_requests).toBeGreaterThanOrEqual(deployment.spec.replicas * perPod);
    expect(t.max_pending_requests).toBeGreaterThanOrEqual(deployment.spec.replicas * perPod);
    for (const hc of cluster.health_checks) {
      expect(hc.grpc_health_check.service_name).toBe("freekv.v1.ComputeService");
      expect(hc.no_traffic_interval, "health checks without traffic (default 60 s)").toBeDefined();
      expect(seconds(hc.no_traffic_interval)).toBeLessThanOrEqual(10);
    }
  });
});

describe("the image (deploy/Dockerfile)", () => {
  const text = readFileSync(join(ROOT, "deploy", "Dockerfile"), "utf8").replace(/\\\n/g, " ");
  const runtime = text.slice(text.lastIndexOf("\nFROM ") + 1);

  it("is built on the CUDA major whose cuBLASLt the addon opens", () => {
    const soname = /libcublasLt\.so\.(\d+)/.exec(readFileSync(join(ROOT, "native", "src", "model", "cuda", "gemm_cublaslt.cu"), "utf8"))!;
    const cuda = /^ARG CUDA_VERSION=(\d+)\./m.exec(text);
    expect(cuda?.[1], "CUDA_VERSION's major").toBe(soname[1]);
    expect(runtime).toMatch(/^FROM nvidia\/cuda:\$\{CUDA_VERSION\}-runtime-/);
  });

  it("checks in its runtime stage that the addon's libraries resolve and the addon loads", () => {
    expect(runtime).toMatch(/apt-get install[^\n]*\blibgomp1\b/);
    expect(runtime).toMatch(/ldconfig -p \| grep -q 'libcublasLt\\\.so\\\.\d+ '/);
    expect(runtime).toMatch(/node -e "[^"]*require\('\.\/native\/build\/Release\/freekv\.node'\)\.backendInfo\(\)/);
  });
});
