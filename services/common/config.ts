/**
 * Configuration from environment variables, validated once at start.
 *
 * Each service declares a zod object whose keys are the variable names. A bad value ends the
 * process with exit code 2 and one line per offending variable, so a misconfigured pod fails its
 * start instead of serving with a guessed value.
 */
import { z } from "zod";

export class ConfigError extends Error {
  constructor(readonly problems: string[]) {
    super(`invalid configuration:\n${problems.map((p) => `  ${p}`).join("\n")}`);
    this.name = "ConfigError";
  }
}

/** Parses `env` with `schema`; throws ConfigError naming each bad variable. */
export function parseConfig<S extends z.ZodObject>(schema: S, env: NodeJS.ProcessEnv = process.env): z.infer<S> {
  const picked: Record<string, string | undefined> = {};
  for (const key of Object.keys(schema.shape)) {
    const v = env[key];
    // An empty variable means "not set", as in a Kubernetes manifest with `value: ""`.
    picked[key] = v === undefined || v === "" ? undefined : v;
  }
  const r = schema.safeParse(picked);
  if (!r.success) {
    throw new ConfigError(r.error.issues.map((i) => `${String(i.path[0] ?? "?")}=${JSON.stringify(picked[String(i.path[0])] ?? "")}: ${i.message}`));
  }
  return r.data;
}

/** Like parseConfig, but prints the problem and exits non-zero: for a service's main(). */
export function loadConfigOrExit<S extends z.ZodObject>(service: string, schema: S, env: NodeJS.ProcessEnv = process.env): z.infer<S> {
  try {
    return parseConfig(schema, env);
  } catch (e) {
    if (e instanceof ConfigError) {
      process.stderr.write(`${service}: ${e.message}\n`);
      process.exit(2);
    }
    throw e;
  }
}

// Field builders shared by the services' schemas.

/** A TCP port; 0 asks the OS for an ephemeral one. */
export const port = (dflt: number) => z.coerce.number().int("must be an integer port").min(0, "must be 0..65535").max(65535, "must be 0..65535").default(dflt);

/** A TCP port, or undefined when unset (the listener is off). */
export const optionalPort = () => z.coerce.number().int("must be an integer port").min(0, "must be 0..65535").max(65535, "must be 0..65535").optional();

export const positiveInt = (dflt: number) => z.coerce.number().int("must be an integer").positive("must be > 0").default(dflt);

export const intInRange = (dflt: number, min: number, max: number) =>
  z.coerce.number().int("must be an integer").min(min, `must be ${min}..${max}`).max(max, `must be ${min}..${max}`).default(dflt);

/** An integer in [min, max], or undefined when unset (the caller picks the default). */
export const optionalIntInRange = (min: number, max: number) =>
  z.coerce.number().int("must be an integer").min(min, `must be ${min}..${max}`).max(max, `must be ${min}..${max}`).optional();

export const numberInRange = (dflt: number, min: number, max: number) =>
  z.coerce.number().finite("must be a number").min(min, `must be ${min}..${max}`).max(max, `must be ${min}..${max}`).default(dflt);

export const nonNegativeInt = (dflt: number) => z.coerce.number().int("must be an integer").min(0, "must be >= 0").default(dflt);

/** "1"/"true"/"yes"/"on" or "0"/"false"/"no"/"off". */
export const flag = (dflt: boolean) =>
  z
    .enum(["1", "0", "true", "false", "yes", "no", "on", "off"], { message: "must be 1/0, true/false, yes/no or on/off" })
    .optional()
    .transform((v) => (v === undefined ? dflt : v === "1" || v === "true" || v === "yes" || v === "on"));

/**
 * A switch read by native code itself (getenv): on for any value but "0", so only "0" and "1" are
 * taken here, where "off" would otherwise pass as false and then switch it on.
 */
export const nativeFlag = () =>
  z
    .enum(["0", "1"], { message: 'must be "0" or "1" (read by native code: any other value would switch it on)' })
    .optional()
    .transform((v) => v === "1");

/**
 * glibc's mmap threshold, set by the addon when it loads (native/src/shm/AddonShm.cpp) from the
 * same variable: validated here so that a bad value stops the service at start instead of being
 * read as 0 (glibc's adaptive default) by strtol. The addon caps it at 32 MiB.
 */
export const mallocMmapThreshold = () => intInRange(256 * 1024, 0, 32 << 20);

export const logLevel = () => z.enum(["fatal", "error", "warn", "info", "debug", "trace", "silent"]).default("info");

/**
 * FREEKV_WRITE_STALL_MS of both services: how long a server stream waits for a client that stopped
 * reading (its transport full) before the call ends with DEADLINE_EXCEEDED (common/streams.ts); 0: no limit.
 */
export const writeStallMs = () => nonNegativeInt(30_000);

export const host = (dflt: string) => z.string().min(1).default(dflt);
