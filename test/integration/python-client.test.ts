/**
 * An independent client in another language: Python grpcio (test/interop/grpc_probe.py) calls
 * health and lists the services by reflection on both tiers. Skipped, saying why, when
 * python3 with grpcio is not installed.
 */
import { execFileSync, spawnSync } from "node:child_process";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { QUIET, startTiers, type Tiers } from "../helpers/services.js";

const python = ["/usr/bin/python3", "python3"].find((p) => spawnSync(p, ["-c", "import grpc"], { stdio: "ignore" }).status === 0);
if (!python) console.warn("python-client tests skipped: no python3 with grpcio (apt-get install python3-grpcio)");

let tiers: Tiers;

describe.skipIf(!python)("Python grpcio client", () => {
  beforeAll(async () => {
    tiers = await startTiers({ kvstoreEnv: QUIET, computeEnv: QUIET });
  });
  afterAll(async () => {
    await tiers?.stop();
  });

  const probe = (address: string) => JSON.parse(execFileSync(python!, ["test/interop/grpc_probe.py", address], { encoding: "utf8", timeout: 30000 })) as { health: string; services: string[]; reflection: string };

  it("sees compute SERVING and its services", () => {
    const r = probe(tiers.compute.address);
    expect(r.health).toBe("SERVING");
    expect(r.reflection).toBe("v1");
    expect(r.services).toContain("freekv.v1.ComputeService");
    expect(r.services).toContain("grpc.health.v1.Health");
  });

  it("sees the kvstore SERVING and its services", () => {
    const r = probe(tiers.kvstore.address);
    expect(r.health).toBe("SERVING");
    expect(r.services).toContain("freekv.v1.KvStoreService");
  });
});
