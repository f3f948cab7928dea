/**
 * Configuration from environment variables, validated once at start.
 *
 * Each service declares a zod object whose keys are the variable names. A bad value ends the
 * process with exit code 2 and one line per offending variable, so a misconfigured pod fails its
 * start instead of serving with a guessed value. A FREEKV_* variable that no part of the project
 * reads (a misspelt name) is reported at start as a warning, with the closest known name.
 */
import { isIPv6 } from "node:net";
import { z } from "zod";
import { createLogger } from "./log.js";

export class ConfigError extends Error {
  constructor(readonly problems: string[]) {
    super(`invalid configuration:\n${problems.map((p) => `  ${p}`).join("\n")}`);
    this.name = "ConfigError";
  }
}

/**
 * `text` with the credentials of every URL in it masked, for logs and error messages: the
 * password of `user:password@host` becomes `***` (`user:***@host`), and userinfo without a colon
 * (`redis://password@host`, which Redis clients take as the password) becomes `***@host`.
 * FREEKV_DIRECTORY and FREEKV_SESSION_OWNERS carry the Redis password this way.
 *
 * Each whitespace-free run with an `@` is masked up to its last `@`, whether or not it parses as a
 * URL: a malformed value (`redis//:pw@host`, a password with an unencoded `/` or `@`) is masked
 * too, at the cost of masking a harmless `name@host` as well.
 */
export function redactCredentials(text: string): string {
  return text.replace(/\S*@\S*/g, (run) => {
    const at = run.lastIndexOf("@");
    const head = run.slice(0, at);
    const scheme = head.indexOf("://");
    const prefix = scheme >= 0 ? head.slice(0, scheme + 3) : "";
    const userinfo = head.slice(prefix.length);
    const colon = userinfo.indexOf(":");
    return `${prefix}${colon >= 0 ? `${userinfo.slice(0, colon)}:***` : "***"}${run.slice(at)}`;
  });
}

/** Parses `env` with `schema`; throws ConfigError naming each bad variable. */
export function parseConfig<S extends z.ZodObject>(schema: S, env: NodeJS.ProcessEnv = process.env): z.infer<S> {
  const picked: Record<string, string | undefined> = {};
  const problems: string[] = [];
  for (const key of Object.keys(schema.shape)) {
    const v = env[key];
    // An empty variable means "not set", as in a Kubernetes manifest with `value: ""`. One of
    // blanks only is refused rather than read as unset (or, by Number(), as 0): it is a typo.
    if (v !== undefined && v !== "" && v.trim() === "") problems.push(`${key}=${JSON.stringify(v)}: is blank (whitespace only): give a value, or leave it empty for the default`);
    picked[key] = v === undefined || v.trim() === "" ? undefined : v;
  }
  const r = schema.safeParse(picked);
  if (!r.success) {
    // The value is echoed with any URL password masked (the Redis URLs carry one).
    for (const i of r.error.issues) problems.push(`${String(i.path[0] ?? "?")}=${redactCredentials(JSON.stringify(picked[String(i.path[0])] ?? ""))}: ${i.message}`);
  }
  if (problems.length) throw new ConfigError(problems);
  return r.data as z.infer<S>;
}

/**
 * FREEKV_* variables read outside the services' schemas (README, "Outside the services'
 * schemas"), so that setting them is not reported as a misspelling. A test checks that this list
 * and the schemas name every FREEKV_* variable the sources read.
 */
export const OTHER_VARIABLES: ReadonlySet<string> = new Set([
  // native/binding.ts, native/shm.ts: where the addons are, before any configuration exists.
  "FREEKV_ADDON",
  "FREEKV_SHM_ADDON",
  // native/build.mjs, at install.
  "FREEKV_CUDA",
  // The manifests' Redis password (deploy/k8s), set in both containers and expanded into
  // FREEKV_DIRECTORY and FREEKV_SESSION_OWNERS by Kubernetes.
  "FREEKV_REDIS_PASSWORD",
  // The test suites' seeds and the fuzz's length (a service they start inherits them).
  "FREEKV_TEST_SEED",
  "FREEKV_CHECK_SEED",
  "FREEKV_FUZZ_CALLS",
]);

/** The variables of every schema declared with serviceSchema(): both services' (each config module imports the other). */
const schemaVariables = new Set<string>();

/**
 * Declares a service's schema: its variables count as known in both services' check for
 * misspelt names (the two containers of a pod often share one ConfigMap, so each sees the other's
 * variables).
 */
export function serviceSchema<S extends z.ZodObject>(schema: S): S {
  for (const key of Object.keys(schema.shape)) schemaVariables.add(key);
  return schema;
}

/** Every FREEKV_* variable the project reads: the declared schemas' and OTHER_VARIABLES. */
export function knownVariables(): Set<string> {
  return new Set([...schemaVariables, ...OTHER_VARIABLES]);
}

/** Optimal string alignment distance (Levenshtein with adjacent transpositions). */
function editDistance(a: string, b: string): number {
  const d: number[][] = Array.from({ length: a.length + 1 }, (_, i) => [i, ...new Array<number>(b.length).fill(0)]);
  for (let j = 1; j <= b.length; j++) d[0][j] = j;
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      d[i][j] = Math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) d[i][j] = Math.min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[a.length][b.length];
}

/**
 * The known names `name` is probably a misspelling of: those within a small edit distance (2, or 3
 * for names over 24 characters), compared without case, or the one name that is `name` with a
 * word added or dropped at its end (FREEKV_KVSTORE_CAPACITY for FREEKV_KVSTORE_CAPACITY_BYTES).
 * Those at the smallest distance (several when they tie), sorted; none when nothing is close.
 */
export function closestVariables(name: string, known: Iterable<string> = knownVariables()): string[] {
  const n = name.toUpperCase();
  const limit = n.length > 24 ? 3 : 2;
  const scored: Array<[string, number]> = [];
  const extended: string[] = [];
  for (const k of known) {
    const d = editDistance(n, k);
    if (d <= limit) scored.push([k, d]);
    else if ((k.startsWith(`${n}_`) && !k.slice(n.length + 1).includes("_")) || (n.startsWith(`${k}_`) && !n.slice(k.length + 1).includes("_"))) extended.push(k);
  }
  scored.sort((x, y) => x[1] - y[1] || x[0].localeCompare(y[0]));
  const near = scored.filter(([, d]) => d === scored[0]?.[1]).map(([k]) => k);
  return near.length ? near : extended.length === 1 ? extended : [];
}

/**
 * The FREEKV_* variables of `env` (any case of the prefix) that no schema nor OTHER_VARIABLES
 * knows, sorted, each with the known names it is probably a misspelling of. Only names: a value
 * may be a secret.
 */
export function unknownVariables(env: NodeJS.ProcessEnv = process.env, known: Set<string> = knownVariables()): Array<{ name: string; closest: string[] }> {
  return Object.keys(env)
    .filter((name) => name.toUpperCase().startsWith("FREEKV_") && !known.has(name))
    .sort()
    .map((name) => ({ name, closest: closestVariables(name, known) }));
}

/** One line about an unknown variable, for the start-up warning. */
export function unknownVariableMessage(u: { name: string; closest: string[] }): string {
  const hint = u.closest.length ? `: did you mean ${u.closest.join(" or ")}?` : "";
  return `${u.name} is not a setting of the compute or the kvstore and is ignored${hint}`;
}

/**
 * Variables the addon reads itself with getenv (README, "Configuration"), where an empty value
 * must mean what it means to the schema: unset. FREEKV_MALLOC_MMAP_THRESHOLD= would be 0 there
 * (strtol of ""), glibc's adaptive threshold, while the schema takes the default.
 */
export const NATIVE_VARIABLES: ReadonlySet<string> = new Set([
  "FREEKV_PREFILL_PROFILE",
  "FREEKV_GEMM_AUTOTUNE",
  "FREEKV_SPEC_REUSE",
  "FREEKV_MEAN_FOLD",
  "FREEKV_RESIDENT_FACTOR",
  "FREEKV_REGISTER_THREADS",
  "FREEKV_REGISTER_AHEAD",
  "FREEKV_PREFILL_OFFLOAD",
  "FREEKV_PREFILL_GATE_UP",
  "FREEKV_PREFILL_CONTEXT_MEMORY",
  "FREEKV_SESSION_DEVICE_MEMORY",
  "FREEKV_TEARDOWN_YIELD_MS",
  "FREEKV_MALLOC_MMAP_THRESHOLD",
]);

/** The addon's own settings (NATIVE_VARIABLES) set in `env`, by name: what a benchmark writes beside its figures (none is a secret). */
export function nativeSettings(env: NodeJS.ProcessEnv = process.env): Record<string, string> {
  return Object.fromEntries([...NATIVE_VARIABLES].filter((k) => env[k] !== undefined && env[k] !== "").sort().map((k) => [k, env[k]!]));
}

/**
 * Removes from `env` the empty variables of `schema` that the addon reads itself, so that the addon
 * (loaded after the configuration) finds them unset, as the schema did. Any other value it reads
 * is the one the schema accepted: the schema takes only what the addon reads the same way (plain
 * decimal integers, its own enum strings and switches).
 */
export function unsetEmptyNativeVariables(schema: z.ZodObject, env: NodeJS.ProcessEnv = process.env): void {
  for (const key of Object.keys(schema.shape)) if (NATIVE_VARIABLES.has(key) && env[key] === "") delete env[key];
}

/**
 * Like parseConfig, but prints the problem and exits non-zero: for a service's main(). Then warns
 * (on the service's log) about FREEKV_* variables nothing reads, and leaves the addon's variables
 * as the schema read them (unsetEmptyNativeVariables).
 */
export function loadConfigOrExit<S extends z.ZodObject>(service: string, schema: S, env: NodeJS.ProcessEnv = process.env): z.infer<S> {
  const unknown = unknownVariables(env);
  let config: z.infer<S>;
  try {
    config = parseConfig(schema, env);
  } catch (e) {
    if (e instanceof ConfigError) {
      process.stderr.write(`${service}: ${e.message}\n`);
      // A misspelt name is a likely cause of a missing or default value: said here too.
      for (const u of unknown) process.stderr.write(`${service}: ${unknownVariableMessage(u)}\n`);
      process.exit(2);
    }
    throw e;
  }
  if (unknown.length) {
    // A warning, not an error: both containers of a pod may share one ConfigMap.
    const level = (config as { FREEKV_LOG_LEVEL?: string }).FREEKV_LOG_LEVEL ?? "info";
    const log = createLogger(service, level);
    for (const u of unknown) log.warn({ variable: u.name, ...(u.closest.length ? { closest: u.closest } : {}) }, unknownVariableMessage(u));
  }
  if (env === process.env) unsetEmptyNativeVariables(schema, env);
  return config;
}

// Field builders shared by the services' schemas.

/**
 * Numbers are taken in plain decimal only: Number() would also take "1e6", "0x40000", "0b1",
 * "8.0" for an integer and " 12 " with its blanks, and the addon's own reading of the variables
 * it shares (strtol(..., 10)) takes "1e6" as 1 and "0x40000" as 0. One spelling, one value,
 * wherever it is read; anything else names the variable and what it takes.
 */
const DECIMAL_INTEGER = /^-?\d+$/;
const DECIMAL_NUMBER = /^-?(\d+(\.\d+)?|\.\d+)$/;

/** An integer in [min, max] written in decimal digits (with a minus sign at most: a negative one is then refused by its range). */
function decimalInteger(min: number, max = Number.MAX_SAFE_INTEGER) {
  const unbounded = max === Number.MAX_SAFE_INTEGER;
  const range = unbounded ? (min === 1 ? "> 0" : `>= ${min}`) : `${min}..${max}`;
  return z
    .string()
    .regex(DECIMAL_INTEGER, `must be an integer in decimal digits, ${range}`)
    .transform(Number)
    .pipe(
      z
        .number()
        .min(min, `must be ${range}`)
        .max(max, unbounded ? `must be at most ${max}` : `must be ${range}`),
    );
}

/** A number in [min, max] written in decimal (digits, a point and digits). */
function decimalNumber(min: number, max: number, tooSmall = `must be ${min}..${max}`, tooLarge = tooSmall) {
  return z.string().regex(DECIMAL_NUMBER, `must be a decimal number (digits, a point and digits), ${min}..${max}`).transform(Number).pipe(z.number().min(min, tooSmall).max(max, tooLarge));
}

/** A TCP port; 0 asks the OS for an ephemeral one. */
export const port = (dflt: number) => decimalInteger(0, 65535).default(dflt);

/** A TCP port, or undefined when unset (the listener is off). */
export const optionalPort = () => decimalInteger(0, 65535).optional();

export const positiveInt = (dflt: number) => decimalInteger(1).default(dflt);

/** An integer > 0, or undefined when unset (the caller picks the default). */
export const optionalPositiveInt = () => decimalInteger(1).optional();

export const intInRange = (dflt: number, min: number, max: number) => decimalInteger(min, max).default(dflt);

/** An integer in [min, max], or undefined when unset (the caller picks the default). */
export const optionalIntInRange = (min: number, max: number) => decimalInteger(min, max).optional();

export const numberInRange = (dflt: number, min: number, max: number) => decimalNumber(min, max).default(dflt);

/** A number of seconds from 0 to `max` (fractions allowed). */
export const seconds = (dflt: number, max: number, maxNote: string) => decimalNumber(0, max, "must be >= 0", `must be <= ${max} (${maxNote})`).default(dflt);

export const nonNegativeInt = (dflt: number) => decimalInteger(0).default(dflt);

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
export const nativeFlag = (defaultOn = false) =>
  z
    .enum(["0", "1"], { message: 'must be "0" or "1" (read by native code: any other value would switch it on)' })
    .optional()
    .transform((v) => (v === undefined ? defaultOn : v === "1"));

/**
 * glibc's mmap threshold, set by the addon when it loads (native/src/shm/AddonShm.cpp) from the
 * same variable: validated here so that a bad value stops the service at start instead of being
 * read otherwise by strtol(..., 10) ("lots" and "0x40000" as 0, glibc's adaptive default; "1e6" as
 * 1): decimal digits only. The addon caps it at 32 MiB. An empty value is unset for both
 * (loadConfigOrExit removes it before the addon loads).
 */
export const mallocMmapThreshold = () => intInRange(256 * 1024, 0, 32 << 20);

export const logLevel = () => z.enum(["fatal", "error", "warn", "info", "debug", "trace", "silent"]).default("info");

/**
 * FREEKV_WRITE_STALL_MS of both services: how long a server stream waits for a client that stopped
 * reading (its transport full) before the call ends with DEADLINE_EXCEEDED (common/streams.ts); 0: no limit.
 */
export const writeStallMs = () => nonNegativeInt(30_000);

export const host = (dflt: string) => z.string().min(1).default(dflt);

/**
 * Whether `s` is `host:port`: a host name or IPv4 address, or an IPv6 address in brackets
 * (`[fd00::5]:50051`, the form gRPC targets and the client package's redirects take), and a
 * port 1..65535. A bare IPv6 address is refused: its last group could be read as the port.
 */
export function isHostPort(s: string): boolean {
  const m = /^(?:\[([^\]\s]+)\]|([^\s:,/@[\]]+)):(\d{1,5})$/.exec(s);
  if (!m) return false;
  if (m[1] !== undefined && !isIPv6(m[1])) return false;
  const port = Number(m[3]);
  return port >= 1 && port <= 65535;
}

const HOST_PORT = "must be host:port (an IPv6 address in brackets: [fd00::5]:50051)";

/** A `host:port` address to dial (isHostPort). */
export const hostPort = () => z.string().refine(isHostPort, HOST_PORT);

/** `host:port[,host:port...]` (blanks around each allowed), or one of `words`. */
export const hostPortList = (...words: string[]) =>
  z.string().refine(
    (s) => words.includes(s) || s.split(",").every((p) => isHostPort(p.trim())),
    `must be host:port[,host:port...]${words.map((w) => ` or "${w}"`).join("")} (an IPv6 address in brackets: [fd00::5]:50051)`,
  );
