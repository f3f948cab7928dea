/**
 * RULER-style synthetic long-context tasks: needles (short fixed-format sentences carrying keys and
 * values) are placed between sentences of natural filler text, and a fixed-format question at the
 * end asks for them. One task is a pure function of (options, seed, index).
 *
 * Formats (fixed so that a small model can learn them):
 *   needle            The value of key {K} is {V}.
 *   variable          VAR {NAME} = {V}.          VAR {NAME} = VAR {OTHER}.
 *   record            Record {K}: value {V}, next {K2}.        (the last one: next end.)
 *   question          \n\nQ: {question} A:
 *   completion        " {answer}."  (several answers: " A1, A2, A3.")
 */
import { Filler } from "./filler.js";
import { Rng } from "./rng.js";

export const FAMILIES = ["single_needle", "multi_key", "multi_value", "multi_query", "variable_tracking", "ordered_retrieval"] as const;
export type Family = (typeof FAMILIES)[number];

export interface Task {
  id: string;
  family: Family;
  seed: number;
  index: number;
  /** Target length of the prompt in tokens (approximate: chars / chars_per_token). */
  context_tokens: number;
  context_chars: number;
  /** Realized position (0..1 of the context before the question) of the first needle the answer depends on. */
  depth: number;
  /** Positions of every needle the answer depends on, in answer order. */
  needle_depths: number[];
  prompt: string;
  /** Strings the output must contain, in this order. */
  answer: string[];
  /** The exact completion taught in training (starts with a space, ends with "."). */
  target: string;
  max_tokens: number;
}

export interface TaskOptions {
  seed: number;
  /** Target prompt length in characters (contextTokens * charsPerToken when given in tokens). */
  contextChars: number;
  contextTokens: number;
  /** Requested depth of the first answer needle; undefined: uniform in [0, 1]. */
  depth?: number;
  family: Family;
}

const ADJECTIVES = [
  "amber", "ancient", "autumn", "bitter", "black", "bold", "brave", "bright", "broken", "calm", "clever", "cold", "copper", "crimson", "curly", "damp",
  "dark", "deep", "dry", "dusty", "eager", "early", "empty", "fancy", "fast", "fierce", "flat", "fresh", "gentle", "giant", "golden", "green",
  "grey", "happy", "heavy", "hidden", "hollow", "humble", "icy", "jolly", "kind", "large", "lazy", "little", "lively", "lone", "loud", "lucky",
  "mellow", "misty", "modern", "noble", "odd", "old", "orange", "pale", "plain", "polite", "proud", "purple", "quick", "quiet", "rapid", "red",
  "rich", "rough", "round", "royal", "rusty", "sacred", "salty", "sharp", "shiny", "silent", "silver", "simple", "sleepy", "slow", "small", "smooth",
  "soft", "solar", "sour", "spicy", "steady", "steep", "stone", "strange", "strong", "sunny", "sweet", "swift", "tall", "tame", "tiny", "wild",
];
const NOUNS = [
  "anchor", "apple", "arrow", "badger", "basket", "beacon", "bear", "bell", "bird", "bottle", "bridge", "brook", "button", "cabin", "camel", "candle",
  "canyon", "castle", "cedar", "cloud", "comet", "coral", "crane", "creek", "crown", "desert", "dragon", "drum", "eagle", "falcon", "feather", "field",
  "flame", "forest", "fox", "garden", "glacier", "harbor", "hawk", "hill", "horse", "island", "jacket", "kettle", "ladder", "lake", "lantern", "leaf",
  "lemon", "lion", "meadow", "mirror", "monkey", "moon", "mountain", "needle", "ocean", "otter", "owl", "palace", "panda", "pebble", "pepper", "piano",
  "pigeon", "pine", "planet", "pond", "rabbit", "raven", "ribbon", "river", "robin", "rocket", "saddle", "salmon", "shadow", "shell", "spider", "spoon",
  "star", "storm", "stream", "tiger", "tower", "train", "tulip", "turtle", "valley", "violin", "wagon", "whale", "willow", "window", "wolf", "zebra",
];

function keyOf(rng: Rng, used: Set<string>): string {
  for (;;) {
    const k = `${rng.pick(ADJECTIVES)}-${rng.pick(NOUNS)}`;
    if (!used.has(k)) {
      used.add(k);
      return k;
    }
  }
}

function valueOf(rng: Rng, used: Set<string>): string {
  for (;;) {
    const digits = rng.int(5, 7);
    let v = String(rng.int(1, 9));
    for (let i = 1; i < digits; i++) v += String(rng.int(0, 9));
    if (!used.has(v)) {
      used.add(v);
      return v;
    }
  }
}

function varOf(rng: Rng, used: Set<string>): string {
  for (;;) {
    let v = "";
    for (let i = 0; i < 5; i++) v += String.fromCharCode(65 + rng.int(0, 25));
    if (!used.has(v)) {
      used.add(v);
      return v;
    }
  }
}

/** "a", "a and b", "a, b and c". */
function listText(xs: string[]): string {
  return xs.length === 1 ? xs[0] : `${xs.slice(0, -1).join(", ")} and ${xs[xs.length - 1]}`;
}

interface Needle {
  text: string;
  /** Requested fractional position in the context. */
  pos: number;
  /** Index in the answer order, or -1 for a distractor. */
  answerIndex: number;
}

interface Spec {
  needles: Needle[];
  question: string;
  answer: string[];
  target: string;
}

/**
 * Answer needles: the first at `depth`, the others uniformly after it, in this order of
 * position (so a chain reads forwards in the text).
 */
function answerPositions(rng: Rng, depth: number, n: number): number[] {
  const rest = Array.from({ length: n - 1 }, () => depth + (1 - depth) * rng.float()).sort((a, b) => a - b);
  return [depth, ...rest];
}

function spec(family: Family, rng: Rng, depth: number): Spec {
  const keys = new Set<string>();
  const values = new Set<string>();
  const needle = (k: string, v: string) => `The value of key ${k} is ${v}.`;
  const distractors = (n: number): Needle[] =>
    Array.from({ length: n }, () => ({ text: needle(keyOf(rng, keys), valueOf(rng, values)), pos: rng.float(), answerIndex: -1 }));
  switch (family) {
    case "single_needle": {
      const k = keyOf(rng, keys);
      const v = valueOf(rng, values);
      return { needles: [{ text: needle(k, v), pos: depth, answerIndex: 0 }], question: `What is the value of key ${k}?`, answer: [v], target: ` ${v}.` };
    }
    case "multi_key": {
      const k = keyOf(rng, keys);
      const v = valueOf(rng, values);
      return {
        needles: [{ text: needle(k, v), pos: depth, answerIndex: 0 }, ...distractors(rng.int(3, 24))],
        question: `What is the value of key ${k}?`,
        answer: [v],
        target: ` ${v}.`,
      };
    }
    case "multi_value": {
      const k = keyOf(rng, keys);
      const vs = Array.from({ length: rng.int(2, 4) }, () => valueOf(rng, values));
      const pos = answerPositions(rng, depth, vs.length);
      return {
        needles: [...vs.map((v, i) => ({ text: needle(k, v), pos: pos[i], answerIndex: i })), ...distractors(rng.int(0, 8))],
        question: `What are all the values of key ${k}?`,
        answer: vs,
        target: ` ${vs.join(", ")}.`,
      };
    }
    case "multi_query": {
      const n = rng.int(2, 4);
      const ks = Array.from({ length: n }, () => keyOf(rng, keys));
      const vs = ks.map(() => valueOf(rng, values));
      const pos = answerPositions(rng, depth, n);
      // Asked in an order of their own, so the answer jumps around the text.
      const asked = rng.shuffle(ks.map((_, i) => i));
      return {
        needles: [...ks.map((k, i) => ({ text: needle(k, vs[i]), pos: pos[i], answerIndex: asked.indexOf(i) })), ...distractors(rng.int(0, 8))],
        question: `What are the values of keys ${listText(asked.map((i) => ks[i]))}?`,
        answer: asked.map((i) => vs[i]),
        target: ` ${asked.map((i) => vs[i]).join(", ")}.`,
      };
    }
    case "variable_tracking": {
      const names = new Set<string>();
      const chain = (len: number, v: string): string[] => {
        const vars = Array.from({ length: len }, () => varOf(rng, names));
        return vars.map((x, i) => (i === 0 ? `VAR ${x} = ${v}.` : `VAR ${x} = VAR ${vars[i - 1]}.`)).concat(vars.map((x) => x));
      };
      const len = rng.int(2, 5);
      const v = valueOf(rng, values);
      const main = chain(len, v);
      const pos = answerPositions(rng, depth, len);
      const needles: Needle[] = main.slice(0, len).map((text, i) => ({ text, pos: pos[i], answerIndex: i }));
      for (let c = rng.int(0, 2); c > 0; c--) {
        const l = rng.int(2, 4);
        const other = chain(l, valueOf(rng, values));
        const p = Array.from({ length: l }, () => rng.float()).sort((a, b) => a - b);
        other.slice(0, l).forEach((text, i) => needles.push({ text, pos: p[i], answerIndex: -1 }));
      }
      const vars = main.slice(len);
      return { needles, question: `Which variables are assigned the value ${v}?`, answer: vars, target: ` ${vars.join(", ")}.` };
    }
    case "ordered_retrieval": {
      const n = rng.int(4, 12);
      const ks = Array.from({ length: n }, () => keyOf(rng, keys));
      const vs = ks.map(() => valueOf(rng, values));
      const item = (i: number) => `${ks[i]}: value ${vs[i]}, next ${i + 1 < n ? ks[i + 1] : "end"}.`;
      // The first record sits at depth; the rest anywhere after it, in shuffled order, so the
      // answer follows the links rather than reading the text top to bottom.
      const pos = answerPositions(rng, depth, n);
      const order = [0, ...rng.shuffle(Array.from({ length: n - 1 }, (_, i) => i + 1))];
      return {
        needles: order.map((i, j) => ({ text: `Record ${item(i)}`, pos: pos[j], answerIndex: i })),
        question: `Start at record ${ks[0]} and follow the next links. List every record in that order.`,
        answer: vs,
        target: " " + ks.map((_, i) => item(i)).join(" "),
      };
    }
  }
}

export function generateTask(filler: Filler, opts: TaskOptions, index: number): Task {
  const rng = new Rng(opts.seed, index, 0x7a5c);
  const requested = opts.depth ?? rng.float();
  const s = spec(opts.family, rng, requested);
  const questionBlock = `\n\nQ: ${s.question} A:`;
  const needleChars = s.needles.reduce((n, x) => n + x.text.length + 1, 0);
  const fillerChars = Math.max(0, opts.contextChars - needleChars - questionBlock.length);
  const { text, sep } = filler.take(rng, fillerChars);
  const total = text.reduce((n, t) => n + t.length + 1, 0);

  // Sentence boundary k for each needle: the first where the filler before it reaches pos * total.
  const at: Needle[][] = Array.from({ length: text.length + 1 }, () => []);
  const sorted = s.needles.map((x, i) => ({ x, i })).sort((a, b) => a.x.pos - b.x.pos || a.i - b.i);
  let k = 0;
  let before = 0;
  for (const { x } of sorted) {
    while (k < text.length && before + (text[k].length + 1) / 2 < x.pos * total) {
      before += text[k].length + 1;
      k++;
    }
    at[k].push(x);
  }

  let prompt = "";
  const offsets = new Map<Needle, number>();
  for (let i = 0; i <= text.length; i++) {
    for (const x of at[i]) {
      offsets.set(x, prompt.length);
      prompt += x.text + " ";
    }
    if (i < text.length) prompt += text[i] + sep[i];
  }
  prompt = prompt.trimEnd();
  const contextLen = Math.max(1, prompt.length);
  prompt += questionBlock;

  const answerNeedles = s.needles.filter((x) => x.answerIndex >= 0).sort((a, b) => a.answerIndex - b.answerIndex);
  const needleDepths = answerNeedles.map((x) => round3(offsets.get(x)! / contextLen));
  const first = Math.min(...answerNeedles.map((x) => offsets.get(x)!));
  return {
    id: `${opts.family}-${opts.seed}-${index}`,
    family: opts.family,
    seed: opts.seed,
    index,
    context_tokens: opts.contextTokens,
    context_chars: opts.contextChars,
    depth: round3(first / contextLen),
    needle_depths: needleDepths,
    prompt,
    answer: s.answer,
    target: s.target,
    max_tokens: Math.ceil(s.target.length / 2) + 8,
  };
}

function round3(x: number): number {
  return Math.round(x * 1000) / 1000;
}

/** Scoring used by the evaluations: every expected answer appears in the output, in order. */
export function scoreOutput(answer: string[], output: string): { hits: number; total: number; allInOrder: boolean } {
  let from = 0;
  let inOrder = true;
  let hits = 0;
  for (const a of answer) {
    if (output.includes(a)) hits++;
    const j = output.indexOf(a, from);
    if (j < 0) inOrder = false;
    else from = j + a.length;
  }
  return { hits, total: answer.length, allInOrder: inOrder };
}
