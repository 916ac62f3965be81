#!/usr/bin/env python
"""Does `--precision auto` pick the faster precision on this CPU? The real run_mlm.py, three ways.

    python bench/precision_choice.py
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python bench/precision_choice.py   # an AMX CPU as one without AMX

Adapts a 6x384 BERT (built from a config and saved, vocabulary 30522) on the machine's
Python docstrings with `run_mlm.py` for --steps steps, seq 128, batch 16: once with the
defaults (--precision auto), once with --precision fp32, once with --precision bf16, each in
a fresh process with an empty precision cache (so the default's start-up timing is
logged). Prints training samples/s of each (with --repeats, the median of interleaved
rounds: the default and the precision it picks are the same run but for the timing, so
their difference in one round is this machine's noise), the default's ratio to the faster
explicit one, and the precision the default chose with its timing line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def prepare(workdir: Path) -> tuple[Path, Path]:
    checkpoint, corpus = workdir / "bert-6x384", workdir / "docstrings.txt"
    if (checkpoint / "model.safetensors").exists():
        return checkpoint, corpus
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from utils.data.corpus import build_corpus
    from utils.data.tokenizer import train_wordpiece_tokenizer

    lines = [t for t in build_corpus("python_docstrings", str(workdir / "hf")).read_text().splitlines() if t.strip()]
    corpus.write_text("\n".join(lines) + "\n")
    tokenizer = train_wordpiece_tokenizer(lines, vocab_size=30522, model_max_length=512)
    tokenizer.save_pretrained(checkpoint)
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                               intermediate_size=1536)).save_pretrained(checkpoint)
    return checkpoint, corpus


def run(workdir: Path, checkpoint: Path, corpus: Path, name: str, precision: str | None, steps: int) -> dict:
    out = workdir / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    cache = workdir / f"cache-{name}"  # empty: the default pays its timing in this run
    shutil.rmtree(cache, ignore_errors=True)
    command = [sys.executable, str(REPO / "run_mlm.py"), "--model_name_or_path", str(checkpoint),
               "--train_file", str(corpus), "--validation_split_percentage", "0", "--max_seq_length", "128",
               "--do_train", "--max_steps", str(steps), "--per_device_train_batch_size", "16",
               "--output_dir", str(out), "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
               "--cache_dir", str(cache), *(["--precision", precision] if precision else [])]
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, "HF_HOME": str(workdir / "hf"), "HF_HUB_OFFLINE": "1"})
    if result.returncode:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    metrics = json.loads((out / "train_results.json").read_text())
    log = result.stdout + result.stderr
    line = re.search(r"Precision: .*", log)
    mixed = re.search(r"mixed precision (\w+)", log)
    return {"samples_per_s": metrics["train_samples_per_second"], "note": line.group(0) if line else "",
            "precision": mixed.group(1) if mixed else "?"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workdir", default="/tmp/run_mlm_precision_choice")
    parser.add_argument("--repeats", type=int, default=1,
                        help="interleaved rounds of the three runs; the table shows each one's median (and range)")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(workdir / "hf"))
    checkpoint, corpus = prepare(workdir)
    from utils.train.precision import cpu_description

    print(f"CPU: {cpu_description()}; BERT 6x384, seq 128, batch 16, {args.steps} steps (samples/s of the whole "
          f"train(); the default's start-up timing is in its log line); median of {args.repeats} interleaved round(s)")
    runs = (("default", None), ("fp32", "fp32"), ("bf16", "bf16"))
    rounds = [{name: run(workdir, checkpoint, corpus, name, precision, args.steps) for name, precision in runs}
              for _ in range(args.repeats)]
    results = {}
    for name, _ in runs:
        rates = [r[name]["samples_per_s"] for r in rounds]
        results[name] = {"samples_per_s": statistics.median(rates), "range": (min(rates), max(rates)),
                         # the default times anew in every round
                         "precision": "/".join(r[name]["precision"] for r in rounds)}
    best = max(results["fp32"]["samples_per_s"], results["bf16"]["samples_per_s"])
    print("| run | precision | train samples/s (min-max) | vs the faster explicit |")
    print("|---|---|---|---|")
    for name, r in results.items():
        low, high = r["range"]
        print(f"| {name} | {r['precision']} | {r['samples_per_s']:.1f} ({low:.1f}-{high:.1f}) | "
              f"{r['samples_per_s'] / best:.2f}x |")
    for r in rounds:
        print(r["default"]["note"])


if __name__ == "__main__":
    main()
