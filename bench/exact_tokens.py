#!/usr/bin/env python
"""Does training see exactly the tokens the text gives? The sentence-transformers case, measured.

    python bench/exact_tokens.py                        # this checkout
    python bench/exact_tokens.py --code /path/to/other/checkout --tag before

Builds, offline, what a user adapting a sentence-transformers MiniLM brings: a 6-layer,
384-wide BERT encoder with no MLM head (`BertModel`), and a WordPiece tokenizer whose
tokenizer.json pads every text to 128 tokens and truncates at 128 (`"padding": {"strategy":
{"Fixed": 128}}`, `"truncation": {"max_length": 128}`), as sentence-transformers saves it.
The text: this machine's Python docstrings cut into short lines, as verse or dialogue
would be, with every 40th paragraph kept whole (longer than 128 tokens).

Then, with the code of `--code` (a checkout of this project):
1. tokenizes and packs the training file with `utils.data.pipeline.preprocess_datasets` and counts
   blocks, tokens, and the fraction of padding and of special tokens in the blocks, against
   what `tokenizer(text)` gives for the same lines;
2. trains `run_mlm.py` from the checkpoint for `--steps` steps per seed;
3. scores each trained model on the same held-out blocks and masks: blocks cut from the
   exact ids of the validation lines, 15% of positions masked with a fixed seed (80% [MASK],
   10% random, 10% kept), so that runs of different code compare on identical input.
Prints one JSON line (RESULT ...) and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BLOCK = 128


def build_case(workdir: Path) -> dict:
    """The corpus, the MiniLM-style checkpoint and its padded tokenizer (built once, reused)."""
    paths = {"train": workdir / "plays.txt", "validation": workdir / "plays_valid.txt",
             "checkpoint": workdir / "minilm-st"}
    if (paths["checkpoint"] / "model.safetensors").exists():
        return paths
    sys.path.insert(0, str(REPO))
    from tokenizers import Tokenizer
    from transformers import BertConfig, BertModel, BertTokenizer

    from utils.data.corpus import build_corpus

    paragraphs = build_corpus("python_docstrings", str(workdir / "hf")).read_text(encoding="utf-8").splitlines()
    lines = []
    for i, paragraph in enumerate(paragraphs):
        # Mostly short lines (a few words, like a play's); a few whole paragraphs longer than a block.
        lines += [paragraph] if i % 40 == 0 else textwrap.wrap(paragraph, width=48)
    n_valid = len(lines) // 20
    paths["validation"].write_text("\n".join(lines[:n_valid]) + "\n", encoding="utf-8")
    paths["train"].write_text("\n".join(lines[n_valid:]) + "\n", encoding="utf-8")

    # The WordPiece vocabulary of an uncased BERT, trained on the text (30522 entries).
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.train_from_iterator(lines, trainers.WordPieceTrainer(
        vocab_size=30522, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    tokenizer = BertTokenizer(vocab=wordpiece.get_vocab(), do_lower_case=True, model_max_length=512)
    checkpoint = paths["checkpoint"]
    tokenizer.save_pretrained(checkpoint)
    # What sentence-transformers writes into tokenizer.json: fixed padding and truncation at 128.
    tokenizer_json = json.loads((checkpoint / "tokenizer.json").read_text())
    tokenizer_json["padding"] = {"strategy": {"Fixed": BLOCK}, "direction": "Right", "pad_to_multiple_of": None,
                                 "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"}
    tokenizer_json["truncation"] = {"direction": "Right", "max_length": BLOCK, "strategy": "LongestFirst",
                                    "stride": 0}
    (checkpoint / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512)
    import torch

    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=True).save_pretrained(checkpoint)  # the encoder only, no MLM head
    return paths


def run_code(code: Path, snippet: str, env: dict | None = None) -> dict:
    """Run `snippet` (which prints RESULT <json>) with `code` first on the path; return its result."""
    out = subprocess.run([sys.executable, "-c", snippet], cwd=code, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(code), **(env or {})})
    results = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not results:
        raise SystemExit(f"failed in {code}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(results[-1][len("RESULT "):])


COUNT_BLOCKS = """
import json, numpy as np
from types import SimpleNamespace
from transformers import AutoTokenizer
from utils.data.pipeline import load_raw_datasets, preprocess_datasets
tokenizer = AutoTokenizer.from_pretrained({checkpoint!r})
args = SimpleNamespace(dataset_name=None, dataset_config_name=None, train_file=[{train!r}], validation_file=None,
                       streaming=False, validation_split_percentage=0, text_column_name=None, whole_word_mask=False,
                       line_by_line=False, pad_to_max_length=False, preprocessing_num_workers=None,
                       overwrite_cache=True, encoding_errors="strict")
raw = load_raw_datasets(args, SimpleNamespace(cache_dir=None, token=None))
blocks = np.array(preprocess_datasets(raw, tokenizer, args, {block})["train"]["input_ids"], dtype=np.int64)
lines = [t for t in raw["train"]["text"] if t.strip()]
exact = tokenizer(lines)["input_ids"]
special = np.isin(blocks, tokenizer.all_special_ids)
print("RESULT " + json.dumps({{
    "lines": len(lines), "characters": sum(map(len, lines)), "blocks": len(blocks), "tokens": int(blocks.size),
    "exact_tokens": sum(map(len, exact)), "pad_fraction": float((blocks == tokenizer.pad_token_id).mean()),
    "special_fraction": float(special.mean()),
    "equals_exact": blocks.ravel().tolist() == [i for ids in exact for i in ids][:blocks.size]}}))
"""


def train(code: Path, paths: dict, output_dir: Path, seed: int, steps: int) -> float:
    started = time.time()
    out = subprocess.run(
        [sys.executable, "run_mlm.py", "--model_name_or_path", str(paths["checkpoint"]),
         "--train_file", str(paths["train"]), "--validation_split_percentage", "0", "--max_seq_length", str(BLOCK),
         "--do_train", "--max_steps", str(steps), "--per_device_train_batch_size", "16", "--learning_rate", "1e-4",
         "--warmup_steps", "3", "--seed", str(seed), "--output_dir", str(output_dir), "--save_strategy", "no",
         "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", str(steps)],
        cwd=code, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(code)})
    if out.returncode:
        raise SystemExit(f"training failed in {code}:\n{out.stderr[-4000:]}")
    return time.time() - started


def score(model_dirs: list[Path], paths: dict, seed: int = 1234) -> list[float]:
    """MLM loss of each model on the same held-out blocks and the same masks."""
    import torch
    from fixed_masks import masked_scores, seeded_masks
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths["checkpoint"])  # the wrapper: exact ids, no padding
    lines = [t for t in paths["validation"].read_text(encoding="utf-8").splitlines() if t.strip()]
    ids = torch.tensor([i for row in tokenizer(lines)["input_ids"] for i in row])
    blocks = ids[: len(ids) // BLOCK * BLOCK].view(-1, BLOCK)[:256]
    inputs, labels = seeded_masks(blocks, tokenizer, seed)
    losses = []
    for model_dir in model_dirs:
        model = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
        losses.append(masked_scores(model, inputs, labels, batch_size=32)["loss"])
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", default=str(REPO), help="checkout of this project whose code to measure")
    parser.add_argument("--tag", default="this checkout")
    parser.add_argument("--workdir", default="/tmp/run_mlm_exact_tokens")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--score", nargs="+", help=argparse.SUPPRESS)  # score existing model dirs only
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(workdir / "hf"))
    paths = build_case(workdir)
    if args.score:
        print(dict(zip(args.score, score([Path(p) for p in args.score], paths))))
        return
    code = Path(args.code).resolve()
    counts = run_code(code, COUNT_BLOCKS.format(checkpoint=str(paths["checkpoint"]), train=str(paths["train"]),
                                                block=BLOCK))
    tag = re.sub(r"\W+", "-", args.tag)
    model_dirs, seconds = [], []
    for seed in args.seeds:
        model_dirs.append(workdir / f"out-{tag}-{seed}")
        seconds.append(train(code, paths, model_dirs[-1], seed, args.steps))
    losses = score(model_dirs, paths)
    result = {"tag": args.tag, **counts, "eval_loss": losses, "train_seconds": seconds}
    print("RESULT " + json.dumps(result))
    print(f"\n{args.tag}: {paths['train'].stat().st_size / 1e6:.1f} MB, {counts['lines']:,} non-blank lines, "
          f"{counts['characters']:,} characters; tokenizer(text) gives {counts['exact_tokens']:,} tokens")
    print("| code | blocks of 128 | tokens in blocks | pad fraction | special fraction | blocks = exact ids "
          "| eval loss per seed (same blocks and masks) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.tag} | {counts['blocks']:,} | {counts['tokens']:,} | {counts['pad_fraction']:.1%} | "
          f"{counts['special_fraction']:.1%} | {counts['equals_exact']} | "
          + ", ".join(f"{loss:.3f}" for loss in losses) + " |")


if __name__ == "__main__":
    main()
