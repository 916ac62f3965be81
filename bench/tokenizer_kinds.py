#!/usr/bin/env python
"""Tokenizer training from scratch, one family per kind: speed, memory, unknown tokens, and what a run makes of it.

    python bench/tokenizer_kinds.py                       # training speed of every kind (~1 min)
    python bench/tokenizer_kinds.py --runs --max_steps 300   # plus a short from-scratch run per family

Corpus: the quickstart's (this machine's Python docstrings, ~1.5 MB), 5% held out. For
each model type, `utils.data.tokenizer_kinds.train_tokenizer` trains its family's tokenizer in a
child process (time and peak RSS are its own); reported: seconds, characters and tokens
per second of training (tokens: what the trained tokenizer makes of the training text),
the vocabulary reached, the saved class and mask token, and the unknown-token rate on
the held-out text. With --runs, `run_mlm.py` trains each family from scratch (the
quickstart's 4x256 shape) and the eval loss and a fill-mask line are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL_TYPES = ["bert", "roberta", "modernbert", "deberta", "xlm-roberta", "albert", "deberta-v2"]
# Text in scripts an English corpus never shows: byte-level BPE still has no unknown token.
OTHER_SCRIPTS = ["Η γάτα βλέπει την μπάλα.", "猫はボールを見る。", "Кошка видит мяч.", "القطة ترى الكرة",
                 "Emoji 😀 and café crème ﬁnal ①."]


def corpus_lines(workdir: Path) -> tuple[list[str], list[str]]:
    from utils.data.corpus import build_corpus

    lines = [t for t in build_corpus("python_docstrings", str(workdir / "hf")).read_text().splitlines() if t.strip()]
    cut = len(lines) // 20
    return lines[cut:], lines[:cut]


def child(model_type: str, workdir: str, vocab_size: int) -> None:
    from transformers import AutoTokenizer

    from utils.data.tokenizer_kinds import kind_of, train_tokenizer, unknown_rate

    train, held_out = corpus_lines(Path(workdir))
    started = time.perf_counter()
    tokenizer = train_tokenizer(iter(train), model_type, vocab_size=vocab_size, model_max_length=512)
    seconds = time.perf_counter() - started
    directory = Path(workdir) / f"tokenizer-{model_type}"
    tokenizer.save_pretrained(directory)
    loaded = AutoTokenizer.from_pretrained(directory)
    tokens = sum(len(ids) for ids in loaded(train, add_special_tokens=False)["input_ids"])
    print("RESULT " + json.dumps({
        "model_type": model_type, "kind": kind_of(loaded), "class": type(loaded).__name__,
        "mask": loaded.mask_token, "vocab": len(loaded), "seconds": seconds,
        "chars_per_s": sum(map(len, train)) / seconds, "tokens_per_s": tokens / seconds,
        "unknown_rate": unknown_rate(loaded, held_out), "unknown_other": unknown_rate(loaded, OTHER_SCRIPTS),
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


def run(model_type: str, workdir: Path, max_steps: int) -> dict:
    """A from-scratch run of `model_type` on the quickstart's corpus and shape; its eval loss and fill-mask lines."""
    mask = "<mask>" if model_type in ("roberta", "xlm-roberta") else "[MASK]"
    overrides = "num_hidden_layers=4,hidden_size=256,num_attention_heads=4,intermediate_size=1024,"
    overrides += "max_position_embeddings=130" if model_type in ("roberta", "xlm-roberta") else \
        "max_position_embeddings=128"
    if model_type == "albert":
        overrides += ",embedding_size=128"
    out = workdir / f"run-{model_type}"
    command = [sys.executable, str(REPO / "run_mlm.py"), str(REPO / "configs" / "quickstart.yaml"),
               "--model_type", model_type, "--config_overrides", overrides, "--output_dir", str(out),
               "--max_steps", str(max_steps), "--save_strategy", "no", "--report_to", "none",
               "--disable_tqdm", "true", "--fill_mask_sentences", f"Return a new {mask} with the same elements."]
    started = time.time()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "HF_HOME": str(workdir / "hf")})
    if result.returncode:
        raise SystemExit(f"{model_type} run failed:\n{result.stderr[-3000:]}")
    metrics = json.loads((out / "all_results.json").read_text())
    fill = result.stdout.split("Fill-mask predictions:\n", 1)[-1].strip().splitlines()
    return {"eval_loss": metrics["eval_loss"], "accuracy": metrics["eval_accuracy"], "fill": " ".join(fill[:2]),
            "minutes": (time.time() - started) / 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_types", nargs="+", default=MODEL_TYPES)
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--runs", action="store_true", help="also train each family from scratch")
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--workdir", default="/tmp/run_mlm_tokenizer_kinds")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.vocab_size)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(workdir / "hf"))
    train, held_out = corpus_lines(workdir)
    print(f"Corpus: Python docstrings, {sum(map(len, train)) / 1e6:.2f} M characters to train on, "
          f"{len(held_out)} held-out lines; vocabulary {args.vocab_size}; {os.cpu_count()} CPUs")
    print("| model type | kind | saved class | mask | vocab | seconds | chars/s | tokens/s | peak RSS MB "
          "| unknown on held-out | unknown on other scripts |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model_type in args.model_types:
        out = subprocess.run([sys.executable, __file__, "--child", model_type, str(workdir), "--vocab_size",
                              str(args.vocab_size)], capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not lines:
            raise SystemExit(f"{model_type} failed:\n{out.stderr[-3000:]}")
        r = json.loads(lines[-1][len("RESULT "):])
        print(f"| {r['model_type']} | {r['kind']} | {r['class']} | {r['mask']} | {r['vocab']} | {r['seconds']:.1f} "
              f"| {r['chars_per_s']:,.0f} | {r['tokens_per_s']:,.0f} | {r['rss_mb']:,.0f} | "
              f"{r['unknown_rate']:.3%} | {r['unknown_other']:.1%} |", flush=True)
    if args.runs:
        print(f"\nFrom scratch, quickstart corpus and shape (4 layers x 256), {args.max_steps} steps:")
        print("| model type | eval loss | accuracy | minutes | fill-mask |")
        print("|---|---|---|---|---|")
        for model_type in args.model_types:
            r = run(model_type, workdir, args.max_steps)
            print(f"| {model_type} | {r['eval_loss']:.3f} | {r['accuracy']:.3f} | {r['minutes']:.1f} | "
                  f"{r['fill']} |", flush=True)


if __name__ == "__main__":
    main()
