"""Tokenize and pack a corpus once, write it to disk in shards, and train from it on any number of machines.

    # the same args file (or flags) as the training run, plus where to write
    python -m utils.tools.prepare_dataset configs/quickstart.yaml --tokenized_dataset_path data/quickstart-128
    python /path/to/run_mlm/utils/tools/prepare_dataset.py ...       # the same, from any directory

    # then train without touching the raw text or the tokenizer again
    accelerate launch --config_file accelerate_configs/multi_node.yaml run_mlm.py configs/quickstart.yaml \\
        --tokenized_dataset_path data/quickstart-128

What the directory holds and how a run checks it: utils/data/prepared.py. The arguments are
run_mlm.py's (a prepared dataset is what that run would tokenize), plus PrepareArguments.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run by its path: make the checkout (utils/, run_mlm.py) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from utils.data.prepared import check_target, write_prepared  # noqa: E402
from utils.errors import UsageError  # noqa: E402


@dataclass
class PrepareArguments:
    """How to write the prepared dataset (where: --tokenized_dataset_path)."""

    max_shard_size: str = field(default="500MB", metadata={"help": "Largest shard file (e.g. 500MB, 2GB)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing prepared dataset."})


def main(argv: list[str] | None = None) -> dict:
    """Prepare the data a training run with the same arguments would tokenize, and write it to disk."""
    from transformers import HfArgumentParser, TrainingArguments

    # The run's own arguments: a prepared dataset is what that run would tokenize.
    from run_mlm import DataTrainingArguments, DownstreamCheckArguments, ModelArguments
    from utils.args import parse_args
    from utils.data import pipeline
    from utils.data import tokenizer as tokenizers
    from utils.logs import setup_tool_logging
    from utils.model import modeling

    setup_tool_logging()  # run_mlm's format
    # run_mlm's args file as it is (its downstream_* keys are accepted, and do not apply here).
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, DownstreamCheckArguments, TrainingArguments,
                               PrepareArguments))
    model_args, data_args, _, training_args, prepare_args = parse_args(parser, argv)
    path = data_args.tokenized_dataset_path
    if path is None:
        raise UsageError("--tokenized_dataset_path: say where to write the prepared dataset")
    if data_args.streaming:
        raise UsageError("--streaming tokenizes during training; drop it to prepare the dataset ahead")
    if data_args.line_by_line:
        raise UsageError("--line_by_line examples are not prepared ahead; prepare packed blocks (drop it)")
    if not (data_args.train_file or data_args.dataset_name or data_args.builtin_corpus or data_args.validation_file):
        raise UsageError("no data given: pass --train_file, --dataset_name or --builtin_corpus")
    check_target(path, prepare_args.overwrite)  # before the work, not only when writing

    started = time.time()
    raw = pipeline.load_text(data_args, model_args, training_args)
    # The tokenizer the run would use, not the one of a dataset prepared earlier at the same path.
    source_args = dataclasses.replace(data_args, tokenized_dataset_path=None)
    tokenizer, source = tokenizers.load_or_train_tokenizer(model_args, source_args, raw, None, training_args)
    _, block_size = modeling.config_and_block_length(model_args, tokenizer, data_args.max_seq_length)
    stats: dict = {}
    blocks = pipeline.preprocess_datasets(raw, tokenizer, data_args, block_size, stats=stats)
    manifest = write_prepared(path, blocks, tokenizer, block_size, data_args, stats,
                              prepare_args.max_shard_size, prepare_args.overwrite)
    seconds = time.time() - started
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    print(f"Prepared {path}: " + ", ".join(f"{split} {s['blocks']} blocks of {block_size} "
                                           f"({s['tokens']:,} tokens from {s['characters']:,} characters, "
                                           f"{s['tokens_lost']} tokens lost)"
                                           for split, s in manifest["splits"].items())
          + f"; {tokens:,} tokens in {seconds:.1f} s ({tokens / seconds:,.0f} tokens/s); tokenizer: {source}",
          flush=True)
    return manifest


if __name__ == "__main__":
    from utils.errors import exit_on_usage_error

    exit_on_usage_error(main)()
