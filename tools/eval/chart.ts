/**
 * The SVG chart of a run: accuracy (all families together) against context length, one line per
 * mode, each point with its 95% Wilson interval as an error bar. Context lengths are evenly spaced
 * in increasing order (the generator's lengths are usually powers of two). Plain SVG 1.1 text,
 * no dependency.
 */
import { mkdirSync, writeFileSync } from "node:fs";
import { dirname } from "node:path";
import type { Summary } from "./summary.js";

/** Okabe-Ito colours (distinguishable with the common colour-vision deficiencies). */
const COLOURS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"];

const esc = (s: string) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
const f = (x: number) => (Math.round(x * 10) / 10).toString();

/** 1024 -> "1K", 1536 -> "1.5K", 1048576 -> "1M", 500 -> "500". */
export function tokensLabel(n: number): string {
  if (n >= 1 << 20 && n % (1 << 18) === 0) return `${n / (1 << 20)}M`;
  if (n >= 1024 && n % 512 === 0) return `${n / 1024}K`;
  return String(n);
}

export function toSvg(s: Summary, title = "freekv eval: accuracy against context length"): string {
  const W = 760;
  const H = 440;
  const L = 64;
  const R = 170;
  const T = 48;
  const B = 64;
  const pw = W - L - R;
  const ph = H - T - B;
  const cells = s.cells.filter((c) => c.family === "all");
  const contexts = [...new Set(cells.map((c) => c.context_tokens))].sort((a, b) => a - b);
  const modes = s.modes.map((m) => m.mode);
  const x = (i: number) => L + (contexts.length === 1 ? pw / 2 : (pw * (i + 0.5)) / contexts.length);
  const y = (acc: number) => T + ph * (1 - acc);
  const out: string[] = [];
  out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="12">`);
  out.push(`<rect width="${W}" height="${H}" fill="#ffffff"/>`);
  out.push(`<text x="${L}" y="24" font-size="15" font-weight="bold">${esc(title)}</text>`);
  // Axes and grid.
  for (let g = 0; g <= 5; g++) {
    const yy = y(g / 5);
    out.push(`<line x1="${L}" y1="${f(yy)}" x2="${L + pw}" y2="${f(yy)}" stroke="${g === 0 ? "#000000" : "#dddddd"}"/>`);
    out.push(`<text x="${L - 8}" y="${f(yy + 4)}" text-anchor="end">${g * 20}%</text>`);
  }
  out.push(`<line x1="${L}" y1="${T}" x2="${L}" y2="${T + ph}" stroke="#000000"/>`);
  contexts.forEach((c, i) => {
    out.push(`<line x1="${f(x(i))}" y1="${T + ph}" x2="${f(x(i))}" y2="${T + ph + 5}" stroke="#000000"/>`);
    out.push(`<text x="${f(x(i))}" y="${T + ph + 20}" text-anchor="middle">${esc(tokensLabel(c))}</text>`);
  });
  out.push(`<text x="${L + pw / 2}" y="${H - 18}" text-anchor="middle">context length (target tokens)</text>`);
  out.push(`<text x="18" y="${T + ph / 2}" text-anchor="middle" transform="rotate(-90 18 ${T + ph / 2})">accuracy (95% Wilson interval)</text>`);
  // One series per mode, nudged sideways so that error bars do not hide each other.
  const step = Math.min(6, pw / Math.max(1, contexts.length) / (modes.length + 1));
  modes.forEach((m, k) => {
    const colour = COLOURS[k % COLOURS.length];
    const dx = (k - (modes.length - 1) / 2) * step;
    const pts = contexts
      .map((c, i) => ({ i, cell: cells.find((z) => z.mode === m && z.context_tokens === c) }))
      .filter((p) => p.cell !== undefined);
    out.push(`<g class="mode" data-mode="${esc(m)}" stroke="${colour}" fill="${colour}">`);
    if (pts.length > 1) out.push(`<polyline fill="none" stroke-width="2" points="${pts.map((p) => `${f(x(p.i) + dx)},${f(y(p.cell!.accuracy))}`).join(" ")}"/>`);
    for (const p of pts) {
      const c = p.cell!;
      const cx = x(p.i) + dx;
      out.push(`<line x1="${f(cx)}" y1="${f(y(c.wilson95[0]))}" x2="${f(cx)}" y2="${f(y(c.wilson95[1]))}" stroke-width="1"/>`);
      out.push(
        `<circle cx="${f(cx)}" cy="${f(y(c.accuracy))}" r="3.5"><title>${esc(`${m}, ${tokensLabel(c.context_tokens)}: ${c.correct}/${c.n} = ${(100 * c.accuracy).toFixed(1)}% [${(100 * c.wilson95[0]).toFixed(1)}, ${(100 * c.wilson95[1]).toFixed(1)}]`)}</title></circle>`,
      );
    }
    out.push(`</g>`);
    const ly = T + 8 + 20 * k;
    out.push(`<line x1="${L + pw + 16}" y1="${ly}" x2="${L + pw + 40}" y2="${ly}" stroke="${colour}" stroke-width="2"/>`);
    out.push(`<circle cx="${L + pw + 28}" cy="${ly}" r="3.5" fill="${colour}"/>`);
    out.push(`<text x="${L + pw + 46}" y="${ly + 4}">${esc(m)}</text>`);
  });
  out.push(`</svg>`);
  return out.join("\n") + "\n";
}

export function writeSvg(file: string, svg: string): void {
  mkdirSync(dirname(file), { recursive: true });
  writeFileSync(file, svg);
}
