/**
 * The compute process: serves freekv.v1.ComputeService to gateways and disaggregated engines,
 * maps the kvstore's segments through the native addon, and at start re-attaches the sessions
 * the kvstore still holds, listens (NOT_SERVING), then loads the served model and turns SERVING
 * once it is ready (a failed load leaves it NOT_SERVING, with the reason logged).
 */
import { channelCredentials, httpsOptions, serverCredentials } from "../common/tls.js";
import { readFileSync } from "node:fs";
import { basename, resolve } from "node:path";
import { loadConfigOrExit, redactCredentials } from "../common/config.js";
import { bindServer, installDrain } from "../common/lifecycle.js";
import { createLogger } from "../common/log.js";
import { createRegistry, startMetricsServer } from "../common/metrics.js";
import { followUpstreamHealth } from "../common/upstream-health.js";
import { computeConfigSchema } from "./config.js";
import { sweepStaleExchanges } from "./attention/exchange.js";
import { StartupError, createContext, loadServedModel } from "./context.js";
import { builtinModelDir } from "./model/loader.js";
import { NO_MODEL } from "./model/served.js";
import { createOpenAIFront, type OpenAIFront } from "./openai/server.js";
import { createComputeServer } from "./server.js";
import { SessionOwners } from "./sessions/owners.js";
import { handOffSessions, handoffPeers } from "./sessions/handoff.js";

async function main(): Promise<void> {
  const config = loadConfigOrExit("compute", computeConfigSchema);
  const log = createLogger("compute", config.FREEKV_LOG_LEVEL);
  const registry = createRegistry("compute");
  let ctx;
  try {
    ctx = createContext(config, log, registry);
  } catch (e) {
    if (e instanceof StartupError) {
      process.stderr.write(`compute: ${e.message}\n`);
      process.exit(2);
    }
    throw e;
  }
  try {
    await ctx.kvstore.waitForReady(config.FREEKV_KVSTORE_TIMEOUT_MS);
  } catch (e) {
    process.stderr.write(`compute: FREEKV_KVSTORE_ADDR=${config.FREEKV_KVSTORE_ADDR}: kvstore not reachable: ${(e as Error).message}\n`);
    process.exit(2);
  }
  const swept = sweepStaleExchanges();
  if (swept.length) {
    log.info({ count: swept.length }, "removed tensor exchanges left by a compute process that is gone");
    log.debug({ segments: swept }, "removed tensor exchanges");
  }
  if (config.FREEKV_SESSION_OWNERS) {
    if (!config.FREEKV_ADVERTISE_ADDRESS) {
      process.stderr.write("compute: FREEKV_SESSION_OWNERS needs FREEKV_ADVERTISE_ADDRESS (host:port at which other pods reach this compute)\n");
      process.exit(2);
    }
    try {
      ctx.owners = await SessionOwners.connect(config.FREEKV_SESSION_OWNERS, config.FREEKV_SESSION_OWNERS_PREFIX, config.FREEKV_ADVERTISE_ADDRESS, log, () =>
        ctx.metrics.ownerFailures.inc(),
      );
    } catch (e) {
      process.stderr.write(`compute: FREEKV_SESSION_OWNERS: not reachable: ${redactCredentials((e as Error).message)}\n`);
      process.exit(2);
    }
    // Announced live for the hand-offs of draining pods (FREEKV_DRAIN_HANDOFF=owners).
    ctx.owners.startHeartbeat();
  } else if (config.FREEKV_DRAIN_HANDOFF === "owners") {
    process.stderr.write("compute: FREEKV_DRAIN_HANDOFF=owners needs FREEKV_SESSION_OWNERS (the live pods are found there)\n");
    process.exit(2);
  }
  const reattached = await ctx.sessions.reattachAll();
  ctx.sessions.startExpiry();
  for (const s of ctx.sessions.list()) {
    const owner = await ctx.owners?.claimUnlessLive(s.id);
    if (owner) await ctx.sessions.dropStale(s.id, owner);
  }
  // How this compute reaches other computes when it moves a session to them.
  let peerCredentials;
  let peerToken: string | undefined;
  try {
    peerCredentials = channelCredentials("FREEKV_PEER", { ca: config.FREEKV_PEER_TLS_CA_FILE, cert: config.FREEKV_PEER_TLS_CLIENT_CERT_FILE, key: config.FREEKV_PEER_TLS_CLIENT_KEY_FILE });
    if (config.FREEKV_PEER_TOKEN_FILE) {
      peerToken = readFileSync(config.FREEKV_PEER_TOKEN_FILE, "utf8").trim();
      if (!/^\S{1,4096}$/.test(peerToken)) throw new Error(`FREEKV_PEER_TOKEN_FILE=${config.FREEKV_PEER_TOKEN_FILE}: must hold one token (1-4096 non-space characters)`);
    }
  } catch (e) {
    process.stderr.write(`compute: ${(e as Error).message}\n`);
    process.exit(2);
  }
  const peers = handoffPeers(config.FREEKV_DRAIN_HANDOFF, config.FREEKV_ADVERTISE_ADDRESS);
  const { server, health, generate, mover, upstream: kvstoreServing } = createComputeServer(ctx, { credentials: peerCredentials, token: peerToken });
  let creds;
  let frontTls;
  try {
    const tls = { cert: config.FREEKV_COMPUTE_TLS_CERT_FILE, key: config.FREEKV_COMPUTE_TLS_KEY_FILE, clientCa: config.FREEKV_COMPUTE_TLS_CLIENT_CA_FILE };
    creds = serverCredentials("FREEKV_COMPUTE", tls);
    frontTls = httpsOptions("FREEKV_COMPUTE", tls);
  } catch (e) {
    process.stderr.write(`compute: ${(e as Error).message}\n`);
    process.exit(2);
  }
  const port = await bindServer(server, config.FREEKV_COMPUTE_HOST, config.FREEKV_COMPUTE_PORT, creds);
  let openai: OpenAIFront | undefined;
  let openaiPort: number | undefined;
  if (config.FREEKV_OPENAI_PORT !== undefined) {
    openai = createOpenAIFront({
      generate,
      auth: ctx.auth,
      serving: () => health.status === "SERVING",
      modelFailure: () => ctx.served.failure,
      modelName: config.FREEKV_MODEL === NO_MODEL ? undefined : (config.FREEKV_MODEL_NAME ?? basename(resolve(config.FREEKV_MODEL || builtinModelDir()))),
      maxBodyBytes: config.FREEKV_OPENAI_MAX_BODY_BYTES,
      defaultMaxTokens: config.FREEKV_MAX_CONTEXT_TOKENS,
      tls: frontTls,
      writeStallMs: config.FREEKV_WRITE_STALL_MS,
      log,
    });
    openaiPort = await openai.listen(config.FREEKV_OPENAI_HOST ?? config.FREEKV_COMPUTE_HOST, config.FREEKV_OPENAI_PORT);
  }
  const metricsServer = await startMetricsServer(registry, config.FREEKV_COMPUTE_METRICS_PORT, config.FREEKV_COMPUTE_METRICS_HOST ?? config.FREEKV_COMPUTE_HOST, log);
  // Compute serves only while its kvstore does: every new session needs it.
  // When it serves again after an outage, it may be a new process that lost the sessions (the
  // in-memory directory): those this process still has open are then marked lost.
  const upstream = followUpstreamHealth(config.FREEKV_KVSTORE_ADDR, "freekv.v1.KvStoreService", log, (serving) => {
    kvstoreServing(serving);
    if (!serving) return;
    ctx.sessions.checkKvstoreSessions().catch((e: Error) => log.warn({ err: e.message }, "cannot list the kvstore's sessions after it served again"));
  }, ctx.kvstoreCredentials);
  // At the end of the drain: sessions committed and unmapped (the kvstore keeps their pages).
  // With FREEKV_DRAIN_HANDOFF, the named sessions first move to the peers (sessions/handoff.ts).
  const cleanup = async () => {
    // Responses still being flushed to slow readers get up to 5 s (or FREEKV_WRITE_STALL_MS, when shorter) to finish.
    await openai?.close(config.FREEKV_WRITE_STALL_MS > 0 ? Math.min(5_000, config.FREEKV_WRITE_STALL_MS) : 5_000);
    await ctx.owners?.leave();
    const to = config.FREEKV_DRAIN_HANDOFF === "owners" ? ((await ctx.owners?.livePeers()) ?? []) : peers;
    // Without a peer, each session is still logged and counted as not handed off.
    if (config.FREEKV_DRAIN_HANDOFF) await handOffSessions(ctx, mover, to, config.FREEKV_DRAIN_HANDOFF_TIMEOUT_MS);
    upstream.stop();
    await ctx.sessions.shutdown();
    ctx.kvstore.close();
    await ctx.owners?.close();
    await metricsServer.close();
  };
  installDrain({ server, health, log, graceMs: config.FREEKV_SHUTDOWN_GRACE_MS, cleanup });
  kvstoreServing(upstream.serving);
  log.info(
    { grpcPort: port, metricsPort: metricsServer.port, openaiPort, kvstore: config.FREEKV_KVSTORE_ADDR, backend: config.FREEKV_BACKEND, engine: !!ctx.engine, reattached },
    "compute listening",
  );
  process.stdout.write(`${JSON.stringify({ ready: "compute", grpcPort: port, metricsPort: metricsServer.port, openaiPort, host: config.FREEKV_COMPUTE_HOST, engine: !!ctx.engine, reattached })}\n`);
  // Health turns SERVING when this is done (and the kvstore serves); a failure is logged by it.
  await loadServedModel(ctx);
}

main().catch((e: unknown) => {
  process.stderr.write(`compute: ${(e as Error).stack ?? String(e)}\n`);
  process.exit(1);
});
