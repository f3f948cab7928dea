"""Byte-level BPE tokenizer for the trained model, with the HF `tokenizers` library.

    python3 tools/train/tokenizer.py --corpus corpus.txt [--tasks tasks.jsonl] --vocab 4096 --out DIR

Writes DIR/tokenizer.json and DIR/tokenizer_config.json (special tokens, Llama-3-style chat
template). Pre-tokenizer: the GPT-2 split pattern with one digit per piece (numbers are spelled
digit by digit, which makes copying values easy for a small model), then GPT-2's byte-to-unicode
mapping. Special tokens take ids 0..4; the post-processor prepends <|begin_of_text|>.
"""
import argparse
import json
import os

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
BOS, EOS, EOT = SPECIALS[0], SPECIALS[1], SPECIALS[4]
# GPT-2's pattern, with \p{N}+ replaced by single digits (an optional leading space).
SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def train_tokenizer(texts, vocab_size, out_dir, max_length=32768):
    """texts: an iterable of strings. Returns the tokenizers.Tokenizer (also written to out_dir)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    write_tokenizer_config(tok, out_dir, max_length)
    return tok


def write_tokenizer_config(tok, out_dir, max_length=32768):
    added = {
        str(tok.token_to_id(s)): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        for s in SPECIALS
    }
    cfg = {
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


def special_ids(tok):
    return {s: tok.token_to_id(s) for s in SPECIALS}


def corpus_texts(corpus_file, limit_bytes=None):
    n = 0
    with open(corpus_file, encoding="utf-8") as f:
        for line in f:
            yield line
            n += len(line)
            if limit_bytes and n >= limit_bytes:
                return


def task_texts(tasks_file):
    with open(tasks_file, encoding="utf-8") as f:
        for line in f:
            t = json.loads(line)
            yield t["prompt"] + t["target"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--tasks", help="JSONL of tasks whose text is added to the training text")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--limit-mb", type=float, default=0, help="use only the first MB of the corpus (0: all)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    def texts():
        yield from corpus_texts(a.corpus, int(a.limit_mb * 1e6) or None)
        if a.tasks:
            yield from task_texts(a.tasks)

    tok = train_tokenizer(texts(), a.vocab, a.out)
    print(json.dumps({"vocab": tok.get_vocab_size(), "specials": special_ids(tok), "out": a.out}))


if __name__ == "__main__":
    main()
