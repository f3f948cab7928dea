#!/usr/bin/env node
// Gathers English prose that ships with this Debian machine into one filler corpus for the
// synthetic long-context tasks and the tokenizer:
//
//   node tools/train/corpus.mjs [--out DIR] [--max-mb 16] [--man-pages 1500]
//
// Sources, each in sorted order so a rerun on the same machine gives the same bytes:
//   /usr/share/common-licenses/*            license texts
//   /usr/share/info/*.info*.gz              GNU manuals (coreutils, find, diffutils, ...)
//   /usr/share/doc/**/{README*,*.txt,*.md,*.rst} (plain or .gz; no changelogs, no copyright files)
//   /usr/share/perl/<v>/pod/*.pod           Perl's manual pages (prose)
//   /usr/share/man/man{1,5,7,8}/*           man pages rendered by man(1) to plain text (first N)
//
// Cleaning: text is folded to ASCII, split into paragraphs, markup is stripped, and a paragraph is
// kept only when it reads like prose (mostly words, few code symbols, sentence punctuation, at
// least 80 characters). Exact duplicate paragraphs are dropped. Output:
//   DIR/corpus.txt    one paragraph per line
//   DIR/corpus.json   sources (files and bytes kept per source), size, paragraphs, sha256
import { createHash } from "node:crypto";
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { basename, join, resolve } from "node:path";
import { gunzipSync } from "node:zlib";

const args = process.argv.slice(2);
const arg = (name, def) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : def;
};
const here = new URL(".", import.meta.url).pathname;
const outDir = resolve(arg("--out", join(here, "..", "..", ".gpu", "corpus")));
const maxBytes = Number(arg("--max-mb", "16")) * 1024 * 1024;
const manPages = Number(arg("--man-pages", "1500"));

function walk(dir, out = []) {
  let entries;
  try {
    entries = readdirSync(dir, { withFileTypes: true });
  } catch {
    return out;
  }
  for (const e of entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))) {
    const p = join(dir, e.name);
    if (e.isDirectory()) walk(p, out);
    else if (e.isFile()) out.push(p);
  }
  return out;
}

function readText(file) {
  try {
    const buf = readFileSync(file);
    return (file.endsWith(".gz") ? gunzipSync(buf) : buf).toString("utf8");
  } catch {
    return "";
  }
}

// ---------------------------------------------------------------------------------------------
// Cleaning

const FOLD = new Map(Object.entries({ "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": " - ", "\u2026": "...", "\u00a0": " ", "\u2022": "", "\u00b7": "" }));

function toAscii(s) {
  s = s.replace(/.\x08/g, ""); // overstrike (bold/underline) from man
  s = s.replace(/[\u2018\u2019\u201c\u201d\u2013\u2014\u2026\u00a0\u2022\u00b7]/g, (c) => FOLD.get(c));
  s = s.normalize("NFKD").replace(/[\u0300-\u036f]/g, "");
  return s.replace(/[^\x09\x0a\x20-\x7e]/g, "");
}

function stripMarkup(p) {
  return p
    .replace(/!?\[([^\]]*)\]\([^)]*\)/g, "$1") // markdown links and images
    .replace(/<[^>\s]+>/g, " ") // tags and <urls>
    .replace(/\b(?:https?|ftp):\/\/\S+/g, " ")
    .replace(/\S+@\S+\.\w+/g, " ") // e-mail addresses
    .replace(/[`*_]{1,3}([^`*_]+)[`*_]{1,3}/g, "$1") // emphasis and code spans
    .replace(/^\s*(?:#{1,6}|[-*+>]|\d+[.)])\s+/, "") // heading, list or quote marker
    .replace(/[BCEFIL]<([^<>]*)>/g, "$1") // pod formatting codes
    .replace(/\s+/g, " ")
    .trim();
}

const CODEY = /[{}[\]<>=;$\\|#_~^`@]/g;
function isProse(p) {
  if (p.length < 80 || p.length > 4000) return false;
  const letters = (p.match(/[A-Za-z]/g) ?? []).length;
  if (letters / p.length < 0.72) return false;
  if ((p.match(CODEY) ?? []).length / p.length > 0.01) return false;
  if (!/[.!?]["')]?$/.test(p)) return false;
  const words = p.split(" ");
  if (words.length < 12) return false;
  const plain = words.filter((w) => /^[a-z][a-z'-]*[a-z][.,;:!?)]?$/.test(w)).length;
  if (plain / words.length < 0.6) return false;
  if (/\b(?:copyright|all rights reserved)\b/i.test(p) && p.length < 300) return false;
  return true;
}

function paragraphs(text) {
  return toAscii(text.replace(/\r\n?/g, "\n"))
    .split(/\n[ \t]*\n+/)
    .map((p) => stripMarkup(p.replace(/-\n\s*/g, "").replace(/\n/g, " ")))
    .filter(isProse);
}

// ---------------------------------------------------------------------------------------------
// Sources

function docFiles() {
  return walk("/usr/share/doc").filter((f) => {
    const b = basename(f).toLowerCase();
    if (/changelog|changes|news|copyright|history|authors|thanks|todo/.test(b)) return false;
    if (f.includes("/examples/")) return false;
    return /^readme/.test(b) || /\.(txt|md|rst|markdown)(\.gz)?$/.test(b);
  });
}

function perlPods() {
  const base = "/usr/share/perl";
  if (!existsSync(base)) return [];
  return walk(base).filter((f) => f.includes("/pod/") && f.endsWith(".pod") && !f.includes("perldelta") && !/perl5\d+delta/.test(f));
}

function manFiles() {
  const out = [];
  for (const sec of ["man7", "man5", "man8", "man1"]) out.push(...walk(join("/usr/share/man", sec)).filter((f) => statSync(f).size > 600));
  return out.slice(0, manPages);
}

function renderMan(file) {
  try {
    const raw = execFileSync("man", ["-l", file], { env: { ...process.env, MANWIDTH: "100", LANG: "C.UTF-8", MAN_KEEP_FORMATTING: "", GROFF_NO_SGR: "1" }, stdio: ["ignore", "pipe", "ignore"], maxBuffer: 64 << 20 });
    // man pages indent their body: paragraph breaks are the blank lines.
    return raw.toString("utf8").replace(/^[ \t]+/gm, "");
  } catch {
    return "";
  }
}

const sources = [
  { name: "common-licenses", files: () => walk("/usr/share/common-licenses"), read: readText },
  { name: "info", files: () => walk("/usr/share/info").filter((f) => /\.info/.test(f)), read: (f) => readText(f).replace(/\x1f[^\n]*\n[^\n]*\n/g, "\n\n") },
  { name: "doc", files: docFiles, read: readText },
  { name: "perl-pod", files: perlPods, read: (f) => readText(f).replace(/^=\w+.*$/gm, "") },
  { name: "man", files: manFiles, read: renderMan },
];

const seen = new Set();
const kept = [];
let total = 0;
const description = { sources: [], bytes: 0, paragraphs: 0, sha256: "", maxBytes, manPages, cleaning: "ASCII fold, paragraphs of >= 80 chars that read as prose (letters >= 72%, code symbols <= 1%, >= 60% plain lowercase words, sentence end), markup stripped, exact duplicates dropped" };
for (const src of sources) {
  const files = src.files();
  let bytes = 0;
  let used = 0;
  for (const f of files) {
    if (total >= maxBytes) break;
    let any = false;
    for (const p of paragraphs(src.read(f))) {
      const h = createHash("sha1").update(p).digest("base64");
      if (seen.has(h)) continue;
      seen.add(h);
      kept.push(p);
      bytes += p.length + 1;
      total += p.length + 1;
      any = true;
      if (total >= maxBytes) break;
    }
    if (any) used++;
  }
  description.sources.push({ name: src.name, filesSeen: files.length, filesUsed: used, bytes });
  process.stderr.write(`${src.name}: ${used}/${files.length} files, ${(bytes / 1e6).toFixed(2)} MB\n`);
}
const text = kept.join("\n") + "\n";
mkdirSync(outDir, { recursive: true });
writeFileSync(join(outDir, "corpus.txt"), text);
description.bytes = Buffer.byteLength(text);
description.paragraphs = kept.length;
description.sha256 = createHash("sha256").update(text).digest("hex");
writeFileSync(join(outDir, "corpus.json"), JSON.stringify(description, null, 2) + "\n");
process.stderr.write(`corpus: ${kept.length} paragraphs, ${(description.bytes / 1e6).toFixed(2)} MB, sha256 ${description.sha256}\n-> ${join(outDir, "corpus.txt")}\n`);
