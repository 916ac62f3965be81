#!/usr/bin/env python
"""Preprocessing throughput: the raw fast tokenizer, the reference's maps, and this project's pipeline.

    python bench/preprocess_throughput.py                      # the base corpus and 200 MB (~10 min on 2 cores)
    python bench/preprocess_throughput.py --sizes 1GB --methods raw project-2 stream

Corpus: the English prose of this machine's Python docstrings (the quickstart's builtin
corpus, ~1.5 MB), repeated to the sizes asked for. Tokenizer: a BERT-style WordPiece
(vocabulary 30522) trained on it once. Blocks of 128 tokens. Each method runs in its own
process with an empty datasets cache, so its time includes reading the text, and its
peak RSS is its own:

- raw: the fast tokenizer's `encode_batch_fast` (on its exact copy: no saved padding) on
  batches of 1000 lines read from the file, ids turned into Python lists (what any pipeline
  has to do at least); its own threads, as the project's single-worker path uses them.
- reference: the reference run_mlm.py's maps: `tokenizer(texts, return_special_tokens_mask=True)`
  storing four columns, then `group_texts` on Python lists, 1000 texts per batch.
- project-1 / project-2: `utils.data.pipeline.preprocess_datasets` with 1 or 2 workers.
- stream: `utils.data.streaming.iter_blocks` over a streamed `datasets` text file (no cache),
  RSS sampled as it goes.

Tokens lost = tokens the raw tokenizer produced minus tokens in blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BLOCK = 128
SIZES = {"base": 0, "50MB": 50 * 10**6, "200MB": 200 * 10**6, "1GB": 10**9}


def rss_mb() -> tuple[float, float]:
    """Peak RSS of this process and of its largest child (worker), in MB."""
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def stored_mb(cache: Path) -> float:
    """Size of the tokenized data written to the cache (map outputs and blocks, not the raw text's Arrow copy)."""
    files = [p for p in cache.rglob("*.arrow") if p.name.startswith(("cache-", "blocks-"))]
    return sum(p.stat().st_size for p in files) / 1e6


# --- the methods, each run in a child process ------------------------------------------------------

def run_raw(corpus: str, tokenizer) -> dict:
    from utils.data.encoding import exact_copy
    from utils.data.pipeline import _non_blank

    # The ids tokenizer(text) gives: no padding or truncation the tokenizer.json may carry.
    backend, tokens = exact_copy(tokenizer)._tokenizer, 0
    with open(corpus, encoding="utf-8") as f:
        while lines := f.readlines(2**20):
            for start in range(0, len(lines), 1000):
                batch = _non_blank(lines[start:start + 1000])
                tokens += sum(len(e.ids) for e in backend.encode_batch_fast(batch, add_special_tokens=True))
    return {"tokens": tokens, "blocks_tokens": None}


def run_reference(corpus: str, tokenizer) -> dict:
    from itertools import chain

    from datasets import load_dataset

    raw = load_dataset("text", data_files=[corpus], split="train")

    def tokenize_function(examples):  # as the reference: every line, four columns
        examples["text"] = [line for line in examples["text"] if len(line) > 0 and not line.isspace()]
        return tokenizer(examples["text"], return_special_tokens_mask=True)

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = len(concatenated[next(iter(examples))]) // BLOCK * BLOCK
        return {k: [t[i:i + BLOCK] for i in range(0, total, BLOCK)] for k, t in concatenated.items()}

    tokenized = raw.map(tokenize_function, batched=True, remove_columns=["text"])
    blocks = tokenized.map(group_texts, batched=True)
    return {"blocks_tokens": len(blocks) * BLOCK}


def run_project(corpus: str, tokenizer, workers: int) -> dict:
    from utils.data.pipeline import load_raw_datasets, preprocess_datasets

    args = SimpleNamespace(dataset_name=None, dataset_config_name=None, train_file=[corpus], validation_file=None,
                           streaming=False, validation_split_percentage=0, text_column_name=None,
                           whole_word_mask=False, line_by_line=False, pad_to_max_length=False,
                           preprocessing_num_workers=workers if workers > 1 else None, overwrite_cache=False)
    raw = load_raw_datasets(args, SimpleNamespace(cache_dir=None, token=None))
    blocks = preprocess_datasets(raw, tokenizer, args, BLOCK)["train"]
    return {"blocks_tokens": len(blocks) * BLOCK}


def run_stream(corpus: str, tokenizer) -> dict:
    from datasets import load_dataset

    from utils.data.streaming import iter_blocks, iter_texts

    stream = load_dataset("text", data_files=[corpus], split="train", streaming=True)
    total = os.path.getsize(corpus)
    samples, n_blocks, chars = [], 0, 0

    def texts():
        nonlocal chars
        for text in iter_texts(stream, "text"):
            chars += len(text) + 1
            yield text

    next_sample = 0.0
    for _ in iter_blocks(texts(), tokenizer, BLOCK):
        n_blocks += 1
        if chars >= next_sample * total:
            samples.append((round(chars / total, 2), round(current_rss_mb())))
            next_sample += 0.1
    samples.append((1.0, round(current_rss_mb())))
    return {"blocks_tokens": n_blocks * BLOCK, "rss_during": samples}


def child(method: str, corpus: str, tokenizer_dir: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    started = time.perf_counter()
    if method == "raw":
        result = run_raw(corpus, tokenizer)
    elif method == "reference":
        result = run_reference(corpus, tokenizer)
    elif method.startswith("project-"):
        result = run_project(corpus, tokenizer, int(method.split("-")[1]))
    elif method == "stream":
        result = run_stream(corpus, tokenizer)
    else:
        raise SystemExit(f"unknown method {method}")
    result["seconds"] = time.perf_counter() - started
    result["rss_main_mb"], result["rss_worker_mb"] = rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


# --- the driver ------------------------------------------------------------------------------------

def prepare_inputs(workdir: Path, sizes: list[str]) -> tuple[Path, dict[str, Path]]:
    from utils.data.corpus import build_corpus
    from utils.data.tokenizer import train_wordpiece_tokenizer

    base = build_corpus("python_docstrings", str(workdir / "hf"))
    tokenizer_dir = workdir / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").exists():
        lines = base.read_text(encoding="utf-8").splitlines()
        train_wordpiece_tokenizer(lines, vocab_size=30522, model_max_length=512).save_pretrained(tokenizer_dir)
    corpora = {}
    text = base.read_bytes()
    for size in sizes:
        target = SIZES[size]
        if target == 0:
            corpora[size] = base
            continue
        path = workdir / f"corpus-{size}.txt"
        if not path.exists() or path.stat().st_size < target:
            with open(path, "wb") as f:
                for _ in range(-(-target // len(text))):
                    f.write(text)
        corpora[size] = path
    return tokenizer_dir, corpora


def run_child(method: str, corpus: Path, tokenizer_dir: Path, workdir: Path) -> dict:
    cache = workdir / f"cache-{method}"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, __file__, "--child", method, str(corpus), str(tokenizer_dir)],
                         env=env, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"{method} failed:\n{out.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["disk_mb"] = stored_mb(cache) if cache.exists() else 0.0
    shutil.rmtree(cache, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["base", "200MB"], choices=list(SIZES))
    parser.add_argument("--methods", nargs="+", default=["raw", "reference", "project-1", "project-2", "stream"])
    parser.add_argument("--workdir", default="/tmp/run_mlm_preprocess_bench")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir, corpora = prepare_inputs(workdir, args.sizes)
    print(f"Machine: {os.cpu_count()} CPUs; tokenizer WordPiece 30522; blocks of {BLOCK}; corpus: Python docstrings "
          f"({corpora[args.sizes[0]].stat().st_size / 1e6:.1f} MB for {args.sizes[0]})", flush=True)
    for size in args.sizes:
        corpus = corpora[size]
        results = {m: run_child(m, corpus, tokenizer_dir, workdir) for m in args.methods}
        raw_tokens = results["raw"]["tokens"] if "raw" in results else None
        print(f"\n## {size}: {corpus.stat().st_size / 1e6:,.0f} MB of text"
              + (f", {raw_tokens:,} tokens" if raw_tokens else ""))
        print("| method | tokens/s | vs raw | vs reference | seconds | peak RSS main + worker (MB) | on disk (MB) "
              "| tokens lost |")
        print("|---|---|---|---|---|---|---|---|")
        for method, r in results.items():
            tokens = raw_tokens or r.get("tokens") or r["blocks_tokens"]
            speed = tokens / r["seconds"]
            vs_raw = f"{speed / (raw_tokens / results['raw']['seconds']):.2f}x" if raw_tokens else "-"
            vs_ref = (f"{speed / (tokens / results['reference']['seconds']):.2f}x" if "reference" in results
                      else "-")
            lost = "-" if r["blocks_tokens"] is None or raw_tokens is None else f"{raw_tokens - r['blocks_tokens']:,}"
            worker = f" + {r['rss_worker_mb']:,.0f}" if r["rss_worker_mb"] > 1 else ""
            print(f"| {method} | {speed:,.0f} | {vs_raw} | {vs_ref} | {r['seconds']:.1f} | "
                  f"{r['rss_main_mb']:,.0f}{worker} | {r['disk_mb']:,.0f} | {lost} |", flush=True)
        if "stream" in results:
            print("stream RSS (MB) by fraction of the corpus read: "
                  + ", ".join(f"{f:.0%}: {m}" for f, m in results["stream"]["rss_during"]))


if __name__ == "__main__":
    main()
