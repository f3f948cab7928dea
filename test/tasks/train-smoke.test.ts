/**
 * The training recipe end to end at toy scale on the CPU (FREEKV_TRAIN_SMOKE=1; needs Python with
 * torch, transformers and tokenizers, and takes a minute or two on two cores): tools/train/train.py
 * trains a tiny model for a few seconds with tasks from the TypeScript generator, saves the
 * Hugging Face folder and runs its accuracy check; the service then loads that folder and its
 * prefill logits equal transformers' on the same tokens.
 */
import { execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, readdirSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { describe, expect, it } from "vitest";
import { loadModel } from "../../services/compute/model/loader.js";

const enabled = process.env.FREEKV_TRAIN_SMOKE === "1";

describe.skipIf(!enabled)("training recipe smoke (FREEKV_TRAIN_SMOKE=1)", () => {
  it("trains, saves a folder the service serves with transformers' logits", async () => {
    const dir = mkdtempSync(join(tmpdir(), "freekv-train-"));
    const corpus = join(dir, "corpus.txt");
    if (existsSync(".gpu/corpus/corpus.txt")) writeFileSync(corpus, readFileSync(".gpu/corpus/corpus.txt", "utf8").slice(0, 3_000_000));
    else execFileSync(process.execPath, ["tools/train/corpus.mjs", "--out", dir, "--man-pages", "100"], { stdio: "inherit" });
    execFileSync(process.execPath, [resolve("node_modules/typescript/bin/tsc"), "-p", "tsconfig.json"], { stdio: "inherit" });
    const out = join(dir, "model");
    execFileSync("python3", [
      "tools/train/train.py", "--corpus", corpus, "--tasks-js", "dist/tools/tasks/main.js", "--out", out, "--minutes", "0.25", "--vocab", "1024",
      "--hidden", "128", "--layers", "2", "--heads", "2", "--kv-heads", "1", "--intermediate", "256", "--stages", "256:0.5,512:0.5",
      "--tokens-per-step", "4096", "--eval-lengths", "512", "--eval-per-family", "1", "--eval-seconds", "10", "--data-workers", "1",
    ], { stdio: "inherit", timeout: 600_000 });
    expect(readdirSync(out).sort()).toEqual(
      ["RECIPE.md", "config.json", "eval.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "training_curve.json"],
    );
    const curve = JSON.parse(readFileSync(join(out, "training_curve.json"), "utf8"));
    expect(curve.steps).toBeGreaterThan(0);
    const ev = JSON.parse(readFileSync(join(out, "eval.json"), "utf8"));
    expect(Object.keys(ev.lengths["512"]).length).toBeGreaterThan(0);

    const prompt = "The value of key amber-falcon is 4829173. Some filler text follows here.\n\nQ: What is the value of key amber-falcon? A:";
    const ref = JSON.parse(
      execFileSync("python3", ["-c", `
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, attn_implementation="eager").eval()
ids = AutoTokenizer.from_pretrained(sys.argv[1]).encode(sys.argv[2])
with torch.no_grad():
    print(json.dumps({"ids": ids, "last": m(torch.tensor([ids])).logits[0, -1].tolist()}))
`, out, prompt]).toString(),
    ) as { ids: number[]; last: number[] };
    const m = loadModel(out);
    expect(m.codec!.encode(prompt, true)).toEqual(ref.ids);
    const logits = await m.model.prefill(1, Int32Array.from(ref.ids), 0, false);
    let maxDiff = 0;
    for (let i = 0; i < ref.last.length; i++) maxDiff = Math.max(maxDiff, Math.abs(logits[i] - ref.last[i]));
    expect(maxDiff).toBeLessThan(1e-3);
  }, 900_000);
});
