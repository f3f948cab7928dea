/**
 * Wilson score interval for a binomial proportion: k successes of n trials, at the normal
 * quantile z (1.96 for 95%). Unlike the normal approximation it stays inside [0, 1] and is not
 * degenerate at 0/n or n/n, which small accuracy cells often are.
 *
 *   center = (p + z^2 / 2n) / (1 + z^2 / n),  half = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)
 */

/** The 0.975 quantile of the standard normal: a two-sided 95% interval. */
export const Z95 = 1.959963984540054;

/** [low, high]; with n = 0 nothing is known and the interval is [0, 1]. */
export function wilsonInterval(k: number, n: number, z = Z95): [number, number] {
  if (!Number.isInteger(k) || !Number.isInteger(n) || n < 0 || k < 0 || k > n) throw new RangeError(`wilsonInterval: need integers 0 <= k <= n, got k=${k}, n=${n}`);
  if (n === 0) return [0, 1];
  const p = k / n;
  const z2 = z * z;
  const denom = 1 + z2 / n;
  const center = (p + z2 / (2 * n)) / denom;
  const half = (z / denom) * Math.sqrt((p * (1 - p)) / n + z2 / (4 * n * n));
  // Exact at the ends (rounding could leave 1e-17 outside).
  return [k === 0 ? 0 : Math.max(0, center - half), k === n ? 1 : Math.min(1, center + half)];
}
