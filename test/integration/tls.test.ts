/**
 * TLS by configuration, real processes: a test CA (openssl) signs the kvstore's, compute's and a
 * client's certificates. The kvstore requires client certificates (mutual TLS) and compute presents
 * its own; compute serves TLS. A client that trusts the CA generates through it; a plaintext
 * client cannot; a compute without a client certificate cannot reach the kvstore and stops at start.
 * The OpenAI front beside a compute with mutual TLS serves HTTPS and requires a client certificate
 * too: neither plaintext HTTP nor a client without a certificate gets an answer.
 */
import { execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { request as httpRequest } from "node:http";
import { request as httpsRequest, type RequestOptions } from "node:https";
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

  it("the OpenAI front of a compute with mutual TLS serves HTTPS only, to clients with a certificate", { timeout: 120_000 }, async () => {
    if (!existsSync(f("ca.crt"))) makeCerts();
    const kvstore = await startService("kvstore", { env: { ...QUIET, FREEKV_KVSTORE_PORT: "0", FREEKV_KVSTORE_METRICS_PORT: "0" } });
    procs.push(kvstore);
    const compute = await startService("compute", {
      env: {
        ...QUIET,
        FREEKV_THREADS: "1",
        FREEKV_COMPUTE_PORT: "0",
        FREEKV_COMPUTE_METRICS_PORT: "0",
        FREEKV_OPENAI_PORT: "0",
        FREEKV_KVSTORE_ADDR: kvstore.address,
        FREEKV_COMPUTE_TLS_CERT_FILE: f("compute.crt"),
        FREEKV_COMPUTE_TLS_KEY_FILE: f("compute.key"),
        FREEKV_COMPUTE_TLS_CLIENT_CA_FILE: f("ca.crt"),
      },
      serving: false,
    });
    procs.push(compute);
    const port = compute.openaiPort!;
    type Outcome = { status?: number; error?: string };
    const settle = (req: ReturnType<typeof httpRequest>): Promise<Outcome> =>
      new Promise((resolve) => {
        req.setTimeout(10_000, () => req.destroy(new Error("timed out")));
        req.on("response", (res) => {
          res.resume();
          resolve({ status: res.statusCode });
        });
        req.on("error", (e) => resolve({ error: e.message }));
        req.end();
      });
    const https = (extra: RequestOptions) => settle(httpsRequest({ host: "127.0.0.1", port, path: "/health", ca: readFileSync(f("ca.crt")), ...extra }));
    // Plaintext HTTP: no answer.
    const plain = await settle(httpRequest({ host: "127.0.0.1", port, path: "/health" }));
    expect(plain.status, "plain HTTP").toBeUndefined();
    // HTTPS without a client certificate: the handshake is refused.
    const anonymous = await https({});
    expect(anonymous.status, "HTTPS without a certificate").toBeUndefined();
    // With one: the front answers (503 until the model is loaded, then 200).
    let withCert: Outcome = {};
    for (let i = 0; i < 100 && withCert.status !== 200; i++) {
      withCert = await https({ cert: readFileSync(f("client.crt")), key: readFileSync(f("client.key")) });
      if (withCert.status !== 200) await new Promise((r) => setTimeout(r, 200));
    }
    expect(withCert).toEqual({ status: 200 });
  });
});
