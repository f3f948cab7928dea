/**
 * The Kubernetes manifests, rendered offline with `kubectl kustomize` for both overlays
 * (deploy/k8s/overlays/{gpu,cpu}; skipped, saying so, where kubectl is not installed):
 * - every object validates against the Kubernetes schemas (kubernetes-models' validators);
 * - every pod template meets the Pod Security "restricted" profile (non-root, no privilege
 *   escalation, all capabilities dropped, RuntimeDefault seccomp, no host namespaces or host
 *   paths, only the allowed volume types) and has a read-only root filesystem;
 * - the sizing rules of freekv.yaml hold: /dev/shm is larger than the kvstore's capacity, and
 *   compute's memory limit covers /dev/shm plus a working set;
 * - probes: liveness on each process's own /livez, the kvstore's gRPC on the loopback only,
 *   and every referenced ConfigMap, Secret and PersistentVolumeClaim is either rendered or the
 *   documented Redis secret.
 */
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { parseAllDocuments } from "yaml";
import * as models from "kubernetes-models";

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

const bytes = (q: string): number => {
  const m = /^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti)?$/.exec(q);
  if (!m) throw new Error(`quantity ${q}`);
  return Number(m[1]) * { "": 1, Ki: 2 ** 10, Mi: 2 ** 20, Gi: 2 ** 30, Ti: 2 ** 40 }[m[2] ?? ""]!;
};

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

      it("sizes /dev/shm above the kvstore's capacity, counts the capacity in the kvstore's memory limit and the rest of /dev/shm in compute's", () => {
        const cfg = (objs.find((o) => o.kind === "ConfigMap" && o.metadata.name === "freekv-config") as Any).data;
        const pod = (objs.find((o) => o.kind === "Deployment" && o.metadata.name === "freekv") as Any).spec.template.spec;
        const shm = bytes(pod.volumes.find((v: Any) => v.name === "shm").emptyDir.sizeLimit);
        const capacity = Number(cfg.FREEKV_KVSTORE_CAPACITY_BYTES);
        expect(capacity).toBeGreaterThan(0);
        expect(shm).toBeGreaterThan(capacity);
        const compute = pod.containers.find((c: Any) => c.name === "compute");
        const limit = bytes(compute.resources.limits.memory);
        // The kvstore allocates the sessions' pages (charged to it); compute creates the tensor exchanges.
        expect(limit - (shm - capacity), "compute's own working set beside the exchanges' room").toBeGreaterThanOrEqual(2 ** 32);
        const kv = pod.initContainers.find((c: Any) => c.name === "kvstore");
        expect(bytes(kv.resources.limits.memory) - capacity, "the kvstore's own working set beside its capacity").toBeGreaterThanOrEqual(2 ** 30);
        expect(cfg.FREEKV_BACKEND).toBe(overlay === "gpu" ? "cuda" : "cpu");
        if (overlay === "gpu") expect(compute.resources.limits["nvidia.com/gpu"]).toBe(1);
        else expect(compute.resources.limits["nvidia.com/gpu"]).toBeUndefined();
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
        const rendered = new Set(objs.map((o) => `${o.kind}/${o.metadata.name}`));
        for (const v of pod.volumes) if (v.persistentVolumeClaim) expect(rendered.has(`PersistentVolumeClaim/${v.persistentVolumeClaim.claimName}`), v.name).toBe(true);
        for (const c of [kv, compute]) for (const f of c.envFrom ?? []) expect(rendered.has(`ConfigMap/${f.configMapRef.name}`)).toBe(true);
        const secrets = [...JSON.stringify(objs).matchAll(/"secretKeyRef":\{[^}]*"name":"([^"]+)"/g)].map((m) => m[1]);
        expect(secrets.length).toBeGreaterThanOrEqual(2);
        expect(new Set(secrets)).toEqual(new Set(["freekv-redis-auth"]));
      });
    });
  }

  it("the gateway example hashes on the session header over the headless Service of the pods", () => {
    const envoy = parseAllDocuments(readFileSync(join(ROOT, "deploy", "gateway", "envoy.yaml"), "utf8"))[0].toJSON() as Any;
    const route = envoy.static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[0].routes[0].route;
    expect(route.hash_policy[0].header.header_name).toBe("x-freekv-session-id");
    const cluster = envoy.static_resources.clusters[0];
    expect(cluster.lb_policy).toBe("RING_HASH");
    const addr = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address;
    expect(addr.address).toBe("freekv-pods.freekv.svc.cluster.local");
    const pods = render("gpu").find((o) => o.kind === "Service" && o.metadata.name === "freekv-pods") as Any;
    expect(pods.spec.clusterIP).toBe("None");
    expect(pods.spec.ports[0].port).toBe(addr.port_value);
  });
});
