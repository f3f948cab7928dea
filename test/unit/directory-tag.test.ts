/**
 * The directory tag in a kvstore's segment names follows the database, not how the URL spells its
 * credentials: a kvstore restarted with a rotated password (or the default port and database
 * written out) still sweeps the segments its killed predecessor left; another database or prefix
 * gets another tag.
 */
import { describe, expect, it } from "vitest";
import { directoryIdentity, directoryTag } from "../../services/kvstore/segments.js";
import { prng } from "../helpers/prng.js";

describe("directoryTag", () => {
  const rand = prng(Number(process.env.FREEKV_TEST_SEED) || 0xd17ec7);
  const word = () => Math.floor(rand() * 2 ** 32).toString(36);

  it("is the same for one database whatever the credentials, scheme, default port and database", () => {
    const host = `redis-${word()}.svc`;
    const prefix = `freekv:${word()}:`;
    const spellings = [
      `redis://${host}`,
      `redis://${host}:6379`,
      `redis://${host}:6379/0`,
      `redis://:${word()}@${host}:6379/0`,
      `redis://${word()}:${word()}@${host}/`,
      `rediss://:${word()}@${host}:6379/0?family=6`,
      `redis://${host.toUpperCase()}:6379/0`,
    ];
    const tags = new Set(spellings.map((u) => directoryTag(u, prefix)));
    expect(tags.size, spellings.join(" ")).toBe(1);
    expect(directoryIdentity(spellings[3])).toBe(`${host}:6379/0`);
  });

  it("differs by host, port, database and prefix", () => {
    const host = `redis-${word()}.svc`;
    const base = directoryTag(`redis://${host}:6379/0`, "p:");
    for (const [url, prefix] of [
      [`redis://other-${host}:6379/0`, "p:"],
      [`redis://${host}:6380/0`, "p:"],
      [`redis://${host}:6379/1`, "p:"],
      [`redis://${host}:6379/0`, "q:"],
    ] as const) expect(directoryTag(url, prefix), `${url} ${prefix}`).not.toBe(base);
    expect(directoryTag(`redis://${host}:6379/0`, "p:")).toMatch(/^[0-9a-f]{12}$/);
  });

  it("takes a text that is not a redis URL as it is", () => {
    expect(directoryIdentity("memory")).toBe("memory");
    expect(directoryIdentity("not a url")).toBe("not a url");
  });
});
