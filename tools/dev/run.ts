/**
 * `npm start`: the kvstore, then compute pointed at it, as two processes with the built-in
 * defaults (CPU backend, in-memory session directory). Prints where they listen, passes their
 * JSON logs through on stderr, and on SIGINT/SIGTERM drains compute and then the kvstore.
 * Ports come from the same variables the services read (FREEKV_COMPUTE_PORT, ...).
 */
import { fileURLToPath } from "node:url";
import { startTiers, type Tiers } from "./launch.js";

export interface RunOptions {
  /** Ephemeral ports instead of the fixed defaults (the demo, tests). */
  ephemeral?: boolean;
  /** Pass the services' logs through to stderr. */
  echo?: boolean;
  env?: Record<string, string | undefined>;
}

/** Starts both tiers; with `ephemeral` every port is chosen by the OS. */
export function runTiers(opts: RunOptions = {}): Promise<Tiers> {
  const env = { ...process.env, ...opts.env };
  const port = (name: string, dflt: string) => (opts.ephemeral ? "0" : (env[name] ?? dflt));
  return startTiers({
    echo: opts.echo,
    detached: true,
    kvstoreEnv: {
      ...opts.env,
      FREEKV_KVSTORE_PORT: port("FREEKV_KVSTORE_PORT", "50052"),
      FREEKV_KVSTORE_METRICS_PORT: port("FREEKV_KVSTORE_METRICS_PORT", "9092"),
    },
    computeEnv: {
      ...opts.env,
      FREEKV_COMPUTE_PORT: port("FREEKV_COMPUTE_PORT", "50051"),
      FREEKV_COMPUTE_METRICS_PORT: port("FREEKV_COMPUTE_METRICS_PORT", "9091"),
    },
  });
}

/** Stops both tiers (compute first) on SIGINT/SIGTERM, then exits with 0 if both exited 0. */
let stopping = false;

/**
 * Stops the tiers (compute first) on SIGINT/SIGTERM, then exits with 0 if both exited 0.
 * Installed before the tiers start: a signal during the start stops what has started.
 */
export function forwardSignals(tiers: () => Tiers | undefined): void {
  for (const sig of ["SIGINT", "SIGTERM"] as const) {
    process.on(sig, () => {
      const t = tiers();
      if (stopping) {
        // A second Ctrl-C: hurry both (the services skip the rest of their grace period).
        t?.compute.child.kill(sig);
        t?.kvstore.child.kill(sig);
        return;
      }
      stopping = true;
      if (!t) {
        pendingSignal = sig;
        return;
      }
      process.stderr.write(`\n${sig}: stopping compute, then the kvstore\n`);
      void (async () => {
        const c = await t.compute.stop(sig);
        const k = await t.kvstore.stop(sig);
        process.stderr.write(`compute exited ${c.code ?? c.signal}, kvstore exited ${k.code ?? k.signal}\n`);
        process.exit(c.code === 0 && k.code === 0 ? 0 : 1);
      })();
    });
  }
}

let pendingSignal: NodeJS.Signals | undefined;

async function main(): Promise<void> {
  let current: Tiers | undefined;
  forwardSignals(() => current);
  const tiers = await runTiers({ echo: true });
  if (pendingSignal) {
    await tiers.stop(pendingSignal);
    process.exit(0);
  }
  current = tiers;
  const { compute, kvstore } = tiers;
  process.stdout.write(
    [
      "FreeKV is running (two processes):",
      `  compute  pid ${compute.pid}  gRPC ${compute.address}  metrics http://${compute.host}:${compute.metricsPort}/metrics${compute.openaiPort !== undefined ? `  OpenAI http://${compute.host}:${compute.openaiPort}/v1` : ""}`,
      `  kvstore  pid ${kvstore.pid}  gRPC ${kvstore.address}  metrics http://${kvstore.host}:${kvstore.metricsPort}/metrics`,
      "Ctrl-C drains and stops both.",
      "",
    ].join("\n"),
  );
  // If either dies on its own, take the other down and report it.
  void Promise.race([compute.exited.then((r) => ["compute", r] as const), kvstore.exited.then((r) => ["kvstore", r] as const)]).then(async ([name, r]) => {
    if (stopping) return;
    stopping = true;
    process.stderr.write(`${name} exited (code ${r.code}, signal ${r.signal}); stopping the other\n`);
    await tiers.stop();
    process.exit(1);
  });
}

// Run only as the entry point itself (not when bundled into, or imported by, the demo).
const self = fileURLToPath(import.meta.url);
if (process.argv[1] === self && /(^|\/)run\.(ts|js|mjs)$/.test(self)) {
  main().catch((e: unknown) => {
    process.stderr.write(`${(e as Error).message}\n`);
    process.exit(1);
  });
}
