/**
 * Configuration values: credentials masked wherever a value is printed, blank and non-decimal
 * numbers refused by name, the addon's own variables passed to it as validated, bracketed IPv6
 * addresses taken wherever host:port is, and misspelt FREEKV_* names reported with the closest
 * known one. FREEKV_TEST_SEED replays the random inputs.
 */
import { readdirSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import {
  ConfigError,
  NATIVE_VARIABLES,
  OTHER_VARIABLES,
  closestVariables,
  isHostPort,
  knownVariables,
  parseConfig,
  redactCredentials,
  unknownVariables,
  unsetEmptyNativeVariables,
} from "../../services/common/config.js";
import { computeConfigSchema } from "../../services/compute/config.js";
import { kvstoreConfigSchema } from "../../services/kvstore/config.js";
import { prng } from "../helpers/prng.js";

const seed = Number(process.env.FREEKV_TEST_SEED) || (Date.now() ^ (process.pid << 12)) >>> 0;
const rand = prng(seed);
const int = (lo: number, hi: number) => lo + Math.floor(rand() * (hi - lo + 1));
const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)];
const SCHEMAS = [computeConfigSchema, kvstoreConfigSchema] as const;
const ROOT = join(import.meta.dirname, "..", "..");

/** The problems parseConfig reports for `env`, or [] when it accepts it. */
function problems(schema: (typeof SCHEMAS)[number], env: Record<string, string>): string[] {
  try {
    parseConfig(schema, env);
    return [];
  } catch (e) {
    if (e instanceof ConfigError) return e.problems;
    throw e;
  }
}

/** The variables a schema reads as integers: "1" or "1024" reads as that number, and no fraction is taken. */
function integerVariables(schema: (typeof SCHEMAS)[number]): string[] {
  const reads = (k: string, v: string) => problems(schema, { [k]: v }).length === 0 && (parseConfig(schema, { [k]: v }) as Record<string, unknown>)[k] === Number(v);
  return Object.keys(schema.shape).filter((k) => (reads(k, "1") || reads(k, "1024")) && problems(schema, { [k]: "1.5" }).length > 0 && problems(schema, { [k]: "1024.5" }).length > 0);
}

/** The variables read as numbers with fractions. */
function fractionVariables(schema: (typeof SCHEMAS)[number]): string[] {
  return Object.keys(schema.shape).filter((k) => problems(schema, { [k]: "0.5" }).length === 0 && (parseConfig(schema, { [k]: "0.5" }) as Record<string, unknown>)[k] === 0.5);
}

/** What native code's strtol(e, &end, 10) reads from `e`: the value and whether all of `e` was read. */
function strtol10(e: string): { value: number; whole: boolean } {
  const m = /^[ \t\n\v\f\r]*([+-]?)(\d*)/.exec(e)!;
  if (!m[2]) return { value: 0, whole: false };
  return { value: (m[1] === "-" ? -1 : 1) * Number(m[2]), whole: m[0].length === e.length };
}

describe(`configuration values (seed ${seed}, FREEKV_TEST_SEED)`, () => {
  it("masks the password of every URL in a text, and only that", () => {
    expect(redactCredentials("kvstore: FREEKV_DIRECTORY=redis://:s3cretPW@127.0.0.1:1/0: Connection is closed.")).toBe("kvstore: FREEKV_DIRECTORY=redis://:***@127.0.0.1:1/0: Connection is closed.");
    expect(redactCredentials("rediss://freekv:pw@redis.example:6380/1")).toBe("rediss://freekv:***@redis.example:6380/1");
    expect(redactCredentials("redis://onlysecret@host:6379")).toBe("redis://***@host:6379");
    // Malformed: masked all the same.
    expect(redactCredentials("redis//:pw@host")).toBe("redis//:***@host");
    expect(redactCredentials('"redis://:p@ss/w:rd@host:1/0"')).toBe('"redis://:***@host:1/0"');
    for (const plain of ["memory", "redis://127.0.0.1:6379/2", "connect ECONNREFUSED 127.0.0.1:1", ""]) expect(redactCredentials(plain)).toBe(plain);
    const ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=%:@/";
    for (let n = 0; n < 300; n++) {
      const password = `Pw${Array.from({ length: int(4, 24) }, () => pick([...ALPHABET])).join("")}`;
      const user = pick(["", "freekv", "default"]);
      const host = pick(["127.0.0.1", "freekv-redis", "[fd00::5]"]);
      const url = `${pick(["redis", "rediss"])}://${user}:${password}@${host}:${int(1, 65535)}/${int(0, 15)}`;
      const text = pick([url, `FREEKV_DIRECTORY=${url}: Connection is closed.`, JSON.stringify(url), `${url} ${url}`]);
      const out = redactCredentials(text);
      expect(out, text).not.toContain(password);
      expect(out, text).toContain(`${user}:***@${host}`);
    }
  });

  it("never echoes a password in a refused value", () => {
    const refused = [
      ...problems(computeConfigSchema, { FREEKV_SESSION_OWNERS: "http://user:0wnersPW@redis:6379/1" }),
      ...problems(computeConfigSchema, { FREEKV_SESSION_OWNERS: "redis//:0wnersPW@redis:6379/1" }),
      ...problems(kvstoreConfigSchema, { FREEKV_DIRECTORY: "etcd://:D1rectoryPW@x" }),
      ...problems(kvstoreConfigSchema, { FREEKV_DIRECTORY: " redis://:D1rectoryPW@x" }),
    ];
    expect(refused).toHaveLength(4);
    for (const p of refused) {
      expect(p).toMatch(/^FREEKV_(SESSION_OWNERS|DIRECTORY)=".*\*\*\*@/);
      expect(p).not.toMatch(/0wnersPW|D1rectoryPW/);
    }
  });

  it("refuses a value of blanks only, naming the variable; an empty one is unset", () => {
    for (const schema of SCHEMAS) {
      for (const key of Object.keys(schema.shape)) {
        const blank = pick([" ", "  ", "\t", " \n", "\u00a0"]);
        const p = problems(schema, { [key]: blank });
        expect(p, `${key}=${JSON.stringify(blank)}`).toHaveLength(1);
        expect(p[0]).toBe(`${key}=${JSON.stringify(blank)}: is blank (whitespace only): give a value, or leave it empty for the default`);
      }
    }
    expect(parseConfig(kvstoreConfigSchema, { FREEKV_KVSTORE_PORT: "", FREEKV_KVSTORE_CAPACITY_BYTES: "" })).toMatchObject({ FREEKV_KVSTORE_PORT: 50052, FREEKV_KVSTORE_CAPACITY_BYTES: 0 });
  });

  it("takes integers in decimal digits only, and says so", () => {
    for (const schema of SCHEMAS) {
      const keys = integerVariables(schema);
      expect(keys.length).toBeGreaterThan(schema === computeConfigSchema ? 20 : 8);
      for (const key of keys) {
        for (const bad of ["1e3", "0x40", "0b1", "0o7", "8.0", " 12 ", "12 ", " 12", "+12", "1_000", "12abc", "Infinity", "1e400"]) {
          const p = problems(schema, { [key]: bad });
          expect(p, `${key}=${JSON.stringify(bad)}`).toHaveLength(1);
          expect(p[0].startsWith(`${key}=${JSON.stringify(bad)}: must be an integer in decimal digits, `), p[0]).toBe(true);
        }
        // The default, written out, reads back as itself.
        const dflt = (parseConfig(schema, {}) as Record<string, unknown>)[key];
        if (typeof dflt === "number") expect((parseConfig(schema, { [key]: String(dflt) }) as Record<string, unknown>)[key]).toBe(dflt);
      }
      for (const key of fractionVariables(schema)) {
        for (const bad of ["1e-1", "0x1", " 0.5", "0.5 ", ".", "1.", "+1", "NaN"]) expect(problems(schema, { [key]: bad }), `${key}=${bad}`).toHaveLength(1);
        for (const good of ["0", "0.25", ".5"]) expect(problems(schema, { [key]: good }), `${key}=${good}`).toEqual([]);
      }
    }
    expect(parseConfig(kvstoreConfigSchema, { FREEKV_KVSTORE_PORT: "08080" }).FREEKV_KVSTORE_PORT).toBe(8080);
    expect(problems(kvstoreConfigSchema, { FREEKV_KVSTORE_PORT: "70000" })).toEqual(['FREEKV_KVSTORE_PORT="70000": must be 0..65535']);
    expect(problems(kvstoreConfigSchema, { FREEKV_KVSTORE_CAPACITY_BYTES: "-1" })).toEqual(['FREEKV_KVSTORE_CAPACITY_BYTES="-1": must be >= 0']);
    expect(problems(kvstoreConfigSchema, { FREEKV_KVSTORE_CAPACITY_BYTES: "99999999999999999999" })).toEqual(['FREEKV_KVSTORE_CAPACITY_BYTES="99999999999999999999": must be at most 9007199254740991']);
  });

  it("passes the addon's own numeric variables only in a form its strtol reads as the same value", () => {
    // Random strings of digits, signs, blanks, points, exponents and hex: whatever the schema
    // takes, the addon reads whole and as the same number (FREEKV_REGISTER_THREADS: and in its range).
    const CHARS = ["0", "1", "2", "4", "6", "8", "9", "0", "3", "x", "e", ".", "-", "+", " ", "a"];
    let accepted = 0;
    for (let n = 0; n < 1000; n++) {
      const v = Array.from({ length: int(1, 8) }, () => pick(CHARS)).join("");
      for (const [schema, key] of [
        [kvstoreConfigSchema, "FREEKV_MALLOC_MMAP_THRESHOLD"],
        [computeConfigSchema, "FREEKV_MALLOC_MMAP_THRESHOLD"],
        [computeConfigSchema, "FREEKV_REGISTER_THREADS"],
      ] as const) {
        if (problems(schema, { [key]: v }).length) continue;
        accepted++;
        const read = strtol10(v);
        expect(read.whole, `${key}=${JSON.stringify(v)}`).toBe(true);
        expect((parseConfig(schema, { [key]: v }) as Record<string, unknown>)[key], `${key}=${JSON.stringify(v)}`).toBe(read.value);
        if (key === "FREEKV_REGISTER_THREADS") expect(read.value >= 1 && read.value <= 64).toBe(true);
      }
    }
    expect(accepted).toBeGreaterThan(100);
    for (const schema of SCHEMAS) {
      for (const bad of ["1e6", "0x40000", "262144.0", " 262144", "262144 "]) expect(problems(schema, { FREEKV_MALLOC_MMAP_THRESHOLD: bad }), bad).toHaveLength(1);
      const t = int(0, 32 << 20);
      expect(parseConfig(schema, { FREEKV_MALLOC_MMAP_THRESHOLD: String(t) }).FREEKV_MALLOC_MMAP_THRESHOLD).toBe(t);
    }
    for (const bad of ["8.0", "0x8", "1e1", " 8", "8 ", "0", "65"]) expect(problems(computeConfigSchema, { FREEKV_REGISTER_THREADS: bad }), bad).toHaveLength(1);
    const r = int(1, 64);
    expect(parseConfig(computeConfigSchema, { FREEKV_REGISTER_THREADS: String(r) }).FREEKV_REGISTER_THREADS).toBe(r);
  });

  it("leaves the addon's empty variables unset, as the schema read them", () => {
    // Empty is unset for the schema (the default, 262144), but strtol("") is 0 for the addon.
    expect(parseConfig(kvstoreConfigSchema, { FREEKV_MALLOC_MMAP_THRESHOLD: "" }).FREEKV_MALLOC_MMAP_THRESHOLD).toBe(256 * 1024);
    const env: NodeJS.ProcessEnv = { FREEKV_MALLOC_MMAP_THRESHOLD: "", FREEKV_REGISTER_THREADS: "", FREEKV_PREFILL_PROFILE: "1", FREEKV_MODEL: "" };
    unsetEmptyNativeVariables(kvstoreConfigSchema, env);
    expect(env).toEqual({ FREEKV_REGISTER_THREADS: "", FREEKV_PREFILL_PROFILE: "1", FREEKV_MODEL: "" });
    unsetEmptyNativeVariables(computeConfigSchema, env);
    expect(env).toEqual({ FREEKV_PREFILL_PROFILE: "1", FREEKV_MODEL: "" });
    // Every variable the addon reads is one of a schema's.
    for (const name of NATIVE_VARIABLES) expect(Object.keys(computeConfigSchema.shape)).toContain(name);
  });

  it("takes bracketed IPv6 addresses wherever host:port is taken", () => {
    for (const good of ["127.0.0.1:50052", "freekv-0.freekv:50051", "[fd00::5]:50051", "[::1]:1", "[2001:db8::1:2]:65535", "[::ffff:10.0.0.1]:443"]) expect(isHostPort(good), good).toBe(true);
    for (const bad of ["fd00::5:50051", "[fd00::5]", "[fd00::5]50051", "[10.0.0.1]:1", "[nothex::g]:1", "host:0", "host:65536", "host", ":1", "a b:1", "user@host:1", "host:1/x", ""]) expect(isHostPort(bad), bad).toBe(false);
    const v6 = () => {
      const groups = Array.from({ length: 8 }, () => int(0, 0xffff).toString(16));
      if (rand() < 0.5) {
        const from = int(0, 6);
        return `${groups.slice(0, from).join(":")}::${groups.slice(from + int(1, 8 - from)).join(":")}`;
      }
      return groups.join(":");
    };
    for (let n = 0; n < 200; n++) {
      const a = `[${v6()}]:${int(1, 65535)}`;
      const b = `[${v6()}]:${int(1, 65535)}`;
      const c = parseConfig(computeConfigSchema, { FREEKV_KVSTORE_ADDR: a, FREEKV_ADVERTISE_ADDRESS: b, FREEKV_DRAIN_HANDOFF: ` ${a} ,${b},10.0.0.2:50051` });
      expect(c).toMatchObject({ FREEKV_KVSTORE_ADDR: a, FREEKV_ADVERTISE_ADDRESS: b });
      // Unbracketed, the port cannot be told from the address.
      expect(problems(computeConfigSchema, { FREEKV_ADVERTISE_ADDRESS: a.replace(/[[\]]/g, "") })[0]).toMatch(/^FREEKV_ADVERTISE_ADDRESS=.*: must be host:port \(an IPv6 address in brackets/);
    }
    expect(parseConfig(computeConfigSchema, { FREEKV_DRAIN_HANDOFF: "owners" }).FREEKV_DRAIN_HANDOFF).toBe("owners");
    for (const bad of ["owners,10.0.0.1:1", "10.0.0.1:1,,10.0.0.2:1", "fd00::5:50051", "10.0.0.1"]) expect(problems(computeConfigSchema, { FREEKV_DRAIN_HANDOFF: bad }), bad).toHaveLength(1);
  });

  it("names the FREEKV_* variables nothing reads, with the closest known name", () => {
    const env = {
      FREEKV_KVSTORE_CAPACITY: "1000",
      FREEKV_LOG_LEVL: "debug",
      freekv_log_level: "debug",
      FREEKV_NOTHING_LIKE_IT: "1",
      FREEKV_KVSTORE_PORT: "1",
      FREEKV_BACKEND: "cpu",
      FREEKV_ADDON: "/x",
      FREEKV_REDIS_PASSWORD: "secret",
      PATH: "/bin",
    };
    expect(unknownVariables(env)).toEqual([
      { name: "FREEKV_KVSTORE_CAPACITY", closest: ["FREEKV_KVSTORE_CAPACITY_BYTES"] },
      { name: "FREEKV_LOG_LEVL", closest: ["FREEKV_LOG_LEVEL"] },
      { name: "FREEKV_NOTHING_LIKE_IT", closest: [] },
      { name: "freekv_log_level", closest: ["FREEKV_LOG_LEVEL"] },
    ]);
    // Random one-character typos of random known names: the name is suggested back.
    const known = [...knownVariables()];
    const LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ_0123456789";
    for (let n = 0; n < 300; n++) {
      const name = pick(known);
      const i = int(8, name.length - 1);
      const typo = pick([
        () => name.slice(0, i) + name.slice(i + 1),
        () => name.slice(0, i) + pick([...LETTERS]) + name.slice(i),
        () => name.slice(0, i) + pick([...LETTERS]) + name.slice(i + 1),
        () => (i + 1 < name.length ? name.slice(0, i) + name[i + 1] + name[i] + name.slice(i + 2) : name.slice(0, i)),
      ])();
      if (known.includes(typo)) continue;
      expect(closestVariables(typo), `${typo} for ${name}`).toContain(name);
    }
  });

  it("knows every FREEKV_* variable the sources read", () => {
    // Sources of the services, the addon, the tools and scripts, the benchmarks and the manifests
    // (not the tests: their own knobs are theirs); not prose (.md), which names old variables too.
    const SOURCE = /\.(ts|mts|mjs|js|cjs|cpp|cc|c|h|hpp|cu|cuh|sh|py|gyp|ya?ml|json)$/;
    const files: string[] = [];
    const walk = (dir: string) => {
      for (const f of readdirSync(dir)) {
        if (f === "node_modules" || f === "build" || f === "results" || f.startsWith(".")) continue;
        const p = join(dir, f);
        if (statSync(p).isDirectory()) walk(p);
        else if (SOURCE.test(f)) files.push(p);
      }
    };
    for (const d of ["services", "native/src", "tools", "scripts", "bench", "deploy"]) walk(join(ROOT, d));
    for (const f of readdirSync(join(ROOT, "native"))) if (SOURCE.test(f)) files.push(join(ROOT, "native", f));
    const found = new Map<string, string>();
    const macros = new Set<string>();
    for (const f of files) {
      const text = readFileSync(f, "utf8");
      // Preprocessor names (#define, #ifdef, binding.gyp's defines) are not variables.
      for (const m of text.matchAll(/#\s*(?:define|ifdef|ifndef|undef)\s+(FREEKV_[A-Z0-9_]+)|defined\((FREEKV_[A-Z0-9_]+)\)|"(FREEKV_[A-Z0-9_]+)=1"/g)) macros.add(m[1] ?? m[2] ?? m[3]);
      for (const m of text.matchAll(/FREEKV_[A-Z0-9_]+/g)) if (!found.has(m[0])) found.set(m[0], f.slice(ROOT.length + 1));
    }
    expect(found.size).toBeGreaterThan(50);
    const known = knownVariables();
    // A name that only begins others (FREEKV_KVSTORE for FREEKV_KVSTORE_TLS_*) is a prefix the TLS helpers complete.
    const prefix = (n: string) => n.endsWith("_") || [...known].some((k) => k.startsWith(`${n}_`));
    const missing = [...found].filter(([n]) => !known.has(n) && !macros.has(n) && !prefix(n)).map(([n, f]) => `${n} (${f})`);
    expect(missing).toEqual([]);
    // And the list names nothing that is read nowhere (the tests and the README count here).
    const everywhere = [readFileSync(join(ROOT, "README.md"), "utf8"), ...files.map((f) => readFileSync(f, "utf8"))];
    const walkTests = (dir: string) => {
      for (const f of readdirSync(dir)) {
        const p = join(dir, f);
        if (statSync(p).isDirectory()) walkTests(p);
        else if (f.endsWith(".ts") && !p.endsWith("config-values.test.ts")) everywhere.push(readFileSync(p, "utf8"));
      }
    };
    walkTests(join(ROOT, "test"));
    for (const name of OTHER_VARIABLES) expect(everywhere.some((t) => t.includes(name)), name).toBe(true);
  });
});
