/**
 * What tools/train writes loads in the service: a tokenizer.json made by tools/train/tokenizer.py
 * (byte-level BPE, digits split) encodes and decodes exactly as Python's `tokenizers` and
 * transformers do (ids recorded in expected.json when the fixture was made), the chat template
 * renders as transformers renders it, and the config.json / generation_config.json that
 * tools/train/train.py saves (transformers 5 spelling, tied embeddings) parse for the native model.
 * The fixture is regenerated with the trainer's code when Python has `tokenizers` (else skipped).
 */
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { describe, expect, it } from "vitest";
import { parseModelConfig } from "../../services/compute/model/config.js";
import { loadTextCodec } from "../../services/compute/model/tokenizer.js";

const DIR = join(import.meta.dirname, "..", "fixtures", "trained-model");
const expected = JSON.parse(readFileSync(join(DIR, "expected.json"), "utf8")) as {
  texts: string[];
  ids: number[][];
  ids_no_special: number[][];
  chat: string;
  chat_ids: number[];
};

function hasPythonTokenizers(): boolean {
  try {
    execFileSync("python3", ["-c", "import tokenizers"], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

describe("a model folder as tools/train writes it", () => {
  const codec = loadTextCodec(DIR)!;

  it("encodes like Python's tokenizers, with BOS from the post-processor", () => {
    expected.texts.forEach((t, i) => {
      expect(codec.encode(t, true)).toEqual(expected.ids[i]);
      expect(codec.encode(t, false)).toEqual(expected.ids_no_special[i]);
    });
    expect(expected.ids[0][0]).toBe(0);
  });

  it("decodes back to the text (byte-level, including non-ASCII)", () => {
    expected.texts.forEach((t, i) => expect(codec.decode(expected.ids_no_special[i])).toBe(t));
  });

  it("spells numbers one digit per token", () => {
    const ids = codec.encode(" 5012345", false);
    expect(ids.length).toBe(7);
  });

  it("renders the chat template as transformers does", () => {
    expect(codec.hasChatTemplate).toBe(true);
    expect(codec.encodeChat([{ role: "user", content: "What is the value of key amber-owl?" }])).toEqual(expected.chat_ids);
  });

  it("config.json and generation_config.json parse for the native model", () => {
    const cfg = JSON.parse(readFileSync(join(DIR, "config.json"), "utf8"));
    const gen = JSON.parse(readFileSync(join(DIR, "generation_config.json"), "utf8"));
    const spec = parseModelConfig(cfg, gen);
    expect(spec.architectureName).toBe("LlamaForCausalLM");
    expect(spec.native).toMatchObject({ hiddenSize: 384, layers: 5, qHeads: 6, kvHeads: 2, headDim: 64, tieWordEmbeddings: true, ropeTheta: 500000, vocabSize: 4096 });
    expect(spec.eosTokenIds).toEqual([1, 4]);
    expect(spec.bosTokenId).toBe(0);
  });

  it.skipIf(!hasPythonTokenizers())("the trainer's tokenizer code gives the same tokenizer.json again", () => {
    const dir = mkdtempSync(join(tmpdir(), "freekv-tok-"));
    // The fixture's training text is not kept; check determinism and loading on a fresh one.
    const text = expected.texts.join("\n").repeat(20);
    writeFileSync(join(dir, "corpus.txt"), text);
    const run = (out: string) =>
      execFileSync("python3", [resolve("tools/train/tokenizer.py"), "--corpus", join(dir, "corpus.txt"), "--vocab", "400", "--out", join(dir, out)]);
    run("a");
    run("b");
    const a = readFileSync(join(dir, "a", "tokenizer.json"), "utf8");
    expect(a).toEqual(readFileSync(join(dir, "b", "tokenizer.json"), "utf8"));
    const c = loadTextCodec(join(dir, "a"))!;
    expect(c.decode(c.encode(expected.texts[7], false))).toBe(expected.texts[7]);
    expect(c.encode("x", true)[0]).toBe(0);
  });
});
