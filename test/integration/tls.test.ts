/**
 * TLS by configuration, real processes: a test CA (openssl) signs the kvstore's, compute's and a
 * client's certificates. The kvstore requires client certificates (mutual TLS) and compute presents
 * its own; compute serves TLS. A client that trusts the CA generates through it; a plaintext
 * client cannot; a compute without a client certificate cannot reach the kvstore and stops at start.
 */
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { credentials, status } from "@grpc/grpc-js";
import { FreeKvClient } from "../../packages/client/src/index.js";
import { QUIET, startService, type ServiceProcess } from "../helpers/services.js";

let openssl = true;
try {
  execFileSync("openssl", ["version"], { stdio: "ignore" });
} catch {
  openssl = false;
}
if (!openssl) console.warn("tls tests skipped: no openssl to make test certificates");

const dir = mkdtempSync(join(tmpdir(), "freekv-tls-"));
const f = (n: string) => join(dir, n);
function makeCerts(): void {
  const ssl = (...a: string[]) => execFileSync("openssl", a, { cwd: dir, stdio: "ignore" });
  ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=freekv-test-ca");
  writeFileSync(f("san.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n");
  for (const name of ["kvstore", "compute", "client"]) {
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", `${name}.key`, "-out", `${name}.csr`, "-subj", `/CN=${name}`);
    ssl("x509", "-req", "-in", `${name}.csr`, "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", `${name}.crt`, "-days", "1", "-extfile", "san.ext");
  }
}

describe.skipIf(!openssl)("TLS between the tiers and to compute", () => {
  const procs: ServiceProcess[] = [];
  afterAll(async () => {
    for (const p of procs.reverse()) await p.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it("serves over TLS with mutual TLS to the kvstore; plaintext and certificate-less peers are refused", { timeout: 120_000 }, async () => {
    makeCerts();
    const kvstore = await startService("kvstore", {
      env: { ...QUIET, FREEKV_KVSTORE_PORT: "0", FREEKV_KVSTORE_METRICS_PORT: "0", FREEKV_KVSTORE_TLS_CERT_FILE: f("kvstore.crt"), FREEKV_KVSTORE_TLS_KEY_FILE: f("kvstore.key"), FREEKV_KVSTORE_TLS_CLIENT_CA_FILE: f("ca.crt") },
      serving: false,
    });
    procs.push(kvstore);
    const computeEnv = { ...QUIET, FREEKV_THREADS: "1", FREEKV_COMPUTE_PORT: "0", FREEKV_COMPUTE_METRICS_PORT: "0", FREEKV_KVSTORE_ADDR: kvstore.address, FREEKV_KVSTORE_TIMEOUT_MS: "3000" };
    // Without a client certificate the kvstore refuses the handshake: compute cannot reach it.
    await expect(startService("compute", { env: { ...computeEnv, FREEKV_KVSTORE_TLS_CA_FILE: f("ca.crt") }, serving: false, timeoutMs: 30_000 })).rejects.toThrow(/kvstore not reachable/);
    const compute = await startService("compute", {
      env: {
        ...computeEnv,
        FREEKV_KVSTORE_TLS_CA_FILE: f("ca.crt"),
        FREEKV_KVSTORE_TLS_CLIENT_CERT_FILE: f("compute.crt"),
        FREEKV_KVSTORE_TLS_CLIENT_KEY_FILE: f("compute.key"),
        FREEKV_COMPUTE_TLS_CERT_FILE: f("compute.crt"),
        FREEKV_COMPUTE_TLS_KEY_FILE: f("compute.key"),
      },
      serving: false,
    });
    procs.push(compute);
    const tls = new FreeKvClient(compute.address, { credentials: credentials.createSsl(readFileSync(f("ca.crt"))), defaultDeadlineMs: 60_000, retry: { maxAttempts: 20, initialBackoffMs: 100, maxBackoffMs: 500 } });
    const plain = new FreeKvClient(compute.address, { retry: { maxAttempts: 1 }, defaultDeadlineMs: 5_000 });
    try {
      // The model loads after the server listens: UNAVAILABLE meanwhile, which the client retries.
      const r = await tls.generateText({ prompt: { $case: "text", value: "over TLS" }, maxTokens: 3 });
      expect(r.tokenIds.length).toBe(3);
      const err = await plain.generateText({ prompt: { $case: "text", value: "plain" }, maxTokens: 3 }).catch((e) => e);
      expect([status.UNAVAILABLE, status.INTERNAL]).toContain(err.code);
    } finally {
      tls.close();
      plain.close();
    }
  });
});
