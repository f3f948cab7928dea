/** Small seeded generator (splitmix64 seeding, xoshiro128** stepping): the same numbers on every machine. */
export class Rng {
  private s: Uint32Array;

  constructor(...seeds: number[]) {
    let x = 0x9e3779b97f4a7c15n;
    for (const v of seeds) x = mix(x ^ BigInt.asUintN(64, BigInt(Math.trunc(v))));
    this.s = new Uint32Array(4);
    for (let i = 0; i < 4; i += 2) {
      x = mix(x + 0x9e3779b97f4a7c15n);
      this.s[i] = Number(x & 0xffffffffn);
      this.s[i + 1] = Number(x >> 32n);
    }
    if (!this.s.some((v) => v !== 0)) this.s[0] = 1;
  }

  /** Uniform 32-bit unsigned integer. */
  u32(): number {
    const s = this.s;
    const r = Math.imul(rotl(Math.imul(s[1], 5), 7), 9) >>> 0;
    const t = s[1] << 9;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 11);
    return r;
  }

  /** Uniform in [0, 1). */
  float(): number {
    return this.u32() / 4294967296;
  }

  /** Uniform integer in [lo, hi] (inclusive). */
  int(lo: number, hi: number): number {
    return lo + Math.floor(this.float() * (hi - lo + 1));
  }

  pick<T>(xs: readonly T[]): T {
    return xs[Math.floor(this.float() * xs.length)];
  }

  shuffle<T>(xs: T[]): T[] {
    for (let i = xs.length - 1; i > 0; i--) {
      const j = Math.floor(this.float() * (i + 1));
      [xs[i], xs[j]] = [xs[j], xs[i]];
    }
    return xs;
  }
}

function mix(z: bigint): bigint {
  z = BigInt.asUintN(64, z);
  z = BigInt.asUintN(64, (z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n);
  z = BigInt.asUintN(64, (z ^ (z >> 27n)) * 0x94d049bb133111ebn);
  return z ^ (z >> 31n);
}

function rotl(x: number, k: number): number {
  return ((x << k) | (x >>> (32 - k))) >>> 0;
}
