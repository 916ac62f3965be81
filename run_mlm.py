#!/usr/bin/env python
"""Train a masked language model (BERT-style MLM) from scratch, or adapt a pretrained one to your text.

Arguments come from an args file (YAML or JSON), flags, or both; flags after the file win:

    # the quickstart: a small ModernBERT from scratch, offline, on 2 CPU cores in a few minutes
    accelerate launch --config_file accelerate_configs/cpu.yaml run_mlm.py configs/quickstart.yaml

    # adapt a pretrained checkpoint to your own files
    accelerate launch --config_file accelerate_configs/cpu.yaml run_mlm.py \\
        --model_name_or_path bert-base-uncased --train_file my_corpus.txt \\
        --do_train --do_eval --output_dir outputs/my-bert

    # any args file, with overrides
    python run_mlm.py configs/quickstart.yaml --max_steps 50 --output_dir outputs/short

A flag replaces its key in the file; a data source given as a flag (--train_file, --dataset_name,
--builtin_corpus, --tokenized_dataset_path) replaces the file's data source, and `--KEY none`
unsets a key of the file. README.md explains the recipes and every flag of this project.

Below: this project's flags (model, data, run), then every `transformers.TrainingArguments` flag.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
from dataclasses import dataclass, field

from transformers import HfArgumentParser, TrainingArguments, set_seed

from utils.args import configure_help, given_keys, leaves_environment_as_found, move_hub_token_to_env, parse_args
from utils.backend import Backend
from utils.data import pipeline, prepared, streaming
from utils.data import tokenizer as tokenizers
from utils.data.corpus import BUILTIN_CORPORA, run_cache_dir
from utils.data.masking import build_collator, mask_eval_dataset, prediction_slots
from utils.data.pipeline import check_extension
from utils.data.tokenizer_kinds import KINDS, choose
from utils.errors import UsageError, exit_on_usage_error
from utils.logs import log_process, setup_logging
from utils.model import modeling
from utils.model.cpu import speed_up_for_cpu
from utils.model.mlm_head import install_mlm_head
from utils.model.modeling import MLM_MODEL_TYPES
from utils.tools import downstream
from utils.tools.fill_mask import format_predictions, predict_masks
from utils.tools.plot_metrics import plot_run
from utils.train import budget, checksums, distributed, effective_args, metrics, recipe, xla
from utils.train.callbacks import NonFiniteGuard, check_nonfinite_option
from utils.train.checkpoints import (
    check_checkpoint_fits,
    find_resume_checkpoint,
    finished_run,
    locked_output_dir,
    save_final_model,
)
from utils.train.cpu_process import fit_cpu_threads
from utils.train.model_card import non_default_args, write_model_card, write_run_args
from utils.train.precision import PRECISIONS, gemm_shapes
from utils.train.segments import RunSegments
from utils.train.signals import GracefulStop, Interrupted
from utils.train.trainer import build_trainer

logger = logging.getLogger("run_mlm")


@dataclass
class ModelArguments:
    """Which model and tokenizer to train: pretrained, or new from a config."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Pretrained model to adapt: a hub id (bert-base-uncased) or a local directory. "
                          "Leave unset to train from scratch."},
    )
    model_type: str | None = field(
        default=None,
        metadata={"help": "From scratch: the architecture to build, one of: " + ", ".join(MLM_MODEL_TYPES)},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "From scratch: config values to change, 'key=value,...' "
                          "(e.g. num_hidden_layers=4,hidden_size=256). Not with config_name/model_name_or_path."},
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Config to build the model from, if not the model's own (hub id or path)."}
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Tokenizer to use, if not the model's own (hub id or path). From scratch with no "
                          "tokenizer, one is trained on the training text (see tokenizer_type)."},
    )
    tokenizer_type: str = field(
        default="auto",
        metadata={"help": "Kind of tokenizer trained from scratch. auto: the model family's own (BERT, DistilBERT, "
                          "ELECTRA: WordPiece; RoBERTa, ModernBERT, DeBERTa: byte-level BPE; XLM-R, CamemBERT, "
                          "ALBERT, DeBERTa-v2: SentencePiece-style Unigram), with its special tokens and class.",
                  "choices": ["auto", *KINDS]},
    )
    tokenizer_vocab_size: int = field(
        default=30522, metadata={"help": "Vocabulary size of the tokenizer trained from scratch."}
    )
    tokenizer_lowercase: bool | None = field(
        default=None, metadata={"help": "Whether the tokenizer trained from scratch lowercases text. Unset: as the "
                                        "family's checkpoints do (BERT, ALBERT: uncased; RoBERTa, XLM-R: cased)."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where to store downloaded models and datasets, and built corpora."}
    )
    use_fast_tokenizer: bool = field(
        default=True, metadata={"help": "Use a fast (Rust) tokenizer; whole_word_mask needs one."}
    )
    model_revision: str = field(
        default="main", metadata={"help": "Model version to load: a branch, tag or commit id."}
    )
    token: str | None = field(
        default=None,
        # repr=False keeps the token out of logs and argument dumps.
        repr=False,
        metadata={"help": "Hugging Face token for private models and datasets (default: the stored login)."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow models, tokenizers and datasets to run code from their hub repository. "
                          "Only for repositories you trust."},
    )
    allow_pickle_weights: bool = field(
        default=False,
        metadata={"help": "Load pretrained weights from pickle files (pytorch_model.bin), which can run code; by "
                          "default only safetensors are loaded. Only for checkpoints you trust."},
    )
    sparse_prediction: bool = field(
        default=True,
        metadata={"help": "Run the MLM head, and the last encoder layer past its keys and values, on the masked "
                          "positions only: the same loss for a fraction of the compute (BERT, RoBERTa, XLM-R, "
                          "DistilBERT, ALBERT, ELECTRA, ModernBERT; other models fall back to the dense head). "
                          "--sparse_prediction false for the dense head."},
    )
    attn_implementation: str = field(
        default="auto",
        metadata={"help": "Attention kernel. auto: FlashAttention-2 on a CUDA GPU in bf16/fp16 when flash_attn is "
                          "installed, else the model's default (SDPA).",
                  "choices": ["auto", "sdpa", "eager", "flash_attention_2"]},
    )
    precision: str = field(
        default="auto",
        metadata={"help": "Training precision. auto: bf16 mixed precision on a TPU or Ampere+ GPU, and on a CPU "
                          "where a bf16 matmul at the model's shapes runs 1.25x fp32 or faster (timed once, "
                          "cached), unless --bf16/--fp16 or the accelerate config chose; else fp32.",
                  "choices": list(PRECISIONS)},
    )
    nonfinite_loss: str = field(
        default="stop",
        metadata={"help": "When a step's loss or gradients are nan/inf: stop (exit status 3, with the step number; "
                          "the last good checkpoint is kept) or skip the batch and go on. Not checked on XLA (TPU).",
                  "choices": ["stop", "skip"]},
    )
    scratch_recipe: bool = field(
        default=True,
        metadata={"help": "From scratch, the settings you do not give take this project's recipe, measured at equal "
                          "wall-clock (README, 'The from-scratch recipe'): " + recipe.describe() + ". false: "
                          "transformers' defaults (learning rate 5e-5, no warm-up, dropout 0.1)."},
    )
    max_train_time: str | None = field(
        default=None,
        metadata={"help": "Train for this much time: 90m, 2h, 1h30m, 45s or 3600 (seconds). The learning-rate schedule "
                          "(--lr_scheduler_type, --warmup_steps: below 1 a fraction of the budget) runs over the "
                          "elapsed time and reaches 0 at the deadline, where training stops, saves and evaluates. "
                          "Counts the training loop with its evaluations and checkpoint saves, not the data "
                          "preparation before it nor the final save and evaluation. With --max_steps or "
                          "--num_train_epochs too, whichever ends first. A resume goes on with the time left."},
    )
    dtype: str | None = field(
        default=None,
        metadata={"help": "Load the weights in this dtype (mixed precision is --bf16/--fp16 instead).",
                  "choices": ["auto", "bfloat16", "float16", "float32"]},
    )

    def __post_init__(self):
        if self.config_overrides is not None and (self.config_name or self.model_name_or_path):
            raise UsageError(
                "--config_overrides builds a model from scratch and can't be combined with "
                "--config_name or --model_name_or_path; drop one of them"
            )
        if self.model_type is not None and self.model_type not in MLM_MODEL_TYPES:
            raise UsageError(f"--model_type {self.model_type!r} is not a masked-LM architecture; "
                             f"choose one of: {', '.join(MLM_MODEL_TYPES)}")
        if not (self.model_name_or_path or self.model_type or self.config_name):
            raise UsageError(
                "no model given: pass --model_name_or_path to adapt a pretrained model, "
                "or --model_type (with --config_overrides) or --config_name to train one from scratch"
            )
        if self.tokenizer_vocab_size < 100:
            raise UsageError(f"--tokenizer_vocab_size {self.tokenizer_vocab_size} is too small; use at least 100")
        if self.max_train_time is not None:
            budget.parse_duration(self.max_train_time)
        if self.model_type is not None and not self.tokenizer_name:
            choose(self.model_type, self.tokenizer_type, self.tokenizer_lowercase)  # a cased family told to lowercase

    @property
    def from_scratch(self) -> bool:
        return self.model_name_or_path is None


@dataclass
class DataTrainingArguments:
    """Which text to train and evaluate on, and how to turn it into masked examples."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset to train on (e.g. wikitext)."}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration of the hub dataset (e.g. wikitext-103-raw-v1)."}
    )
    train_file: list[str] | None = field(
        default=None,
        metadata={"help": "Training text: .txt (one text per line), .csv, .json/.jsonl or .parquet files, "
                          "optionally compressed. Several paths or globs allowed."},
    )
    validation_file: list[str] | None = field(
        default=None, metadata={"help": "Evaluation text, in the same formats as --train_file."}
    )
    builtin_corpus: str | None = field(
        default=None,
        metadata={"help": "Train on a corpus built at run time from files on this machine, no download: "
                          "'python_docstrings' is the English prose in Python's standard library (~1.5 MB).",
                  "choices": list(BUILTIN_CORPORA)},
    )
    encoding_errors: str = field(
        default="strict",
        metadata={"help": "What to do with bytes that are not UTF-8 in text, csv and json files: strict (stop with "
                          "the file and line), replace (with U+FFFD) or ignore (drop them).",
                  "choices": ["strict", "replace", "ignore"]},
    )
    text_column_name: str | None = field(
        default=None, metadata={"help": "Column holding the text (default: 'text', else the only string column)."}
    )
    overwrite_cache: bool = field(
        default=False, metadata={"help": "Redo tokenization instead of reading the datasets cache."}
    )
    validation_split_percentage: float = field(
        default=5,
        metadata={"help": "Without a validation split, the percentage of training rows held out for evaluation."},
    )
    max_seq_length: int | None = field(
        default=None,
        metadata={"help": "Tokens per example (block length). Default: the smaller of the tokenizer's and "
                          "the model's limits, at most 1024."},
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenization (default: one)."}
    )
    mlm_probability: float = field(
        default=0.15, metadata={"help": "Fraction of tokens selected for prediction in training, in (0, 1). From "
                                     "scratch, unset: 0.3 (--scratch_recipe)."}
    )
    eval_mlm_probability: float | None = field(
        default=None,
        metadata={"help": "Fraction of tokens selected for prediction in evaluation. Default 0.15 (BERT's) whatever "
                          "--mlm_probability is, so that eval losses compare across runs."},
    )
    max_predictions_per_seq: int | None = field(
        default=None,
        metadata={"help": "At most this many selected (predicted) tokens per block; a block with more keeps a random "
                          "subset, the rest left unmasked, counted in the log (BERT's flag). Default: no cap, except "
                          "on XLA (TPU) with sparse prediction, whose head predicts a fixed number of slots per block: "
                          "the mean number selected plus 3 standard deviations, a multiple of 8 (32 at 128 tokens "
                          "and 15%; about 1 block in 1000 goes over)."},
    )
    mask_replace_prob: float = field(
        default=0.8, metadata={"help": "Of the selected tokens, the fraction replaced by the mask token."}
    )
    random_replace_prob: float = field(
        default=0.1,
        metadata={"help": "Of the selected tokens, the fraction replaced by a random token (the rest stay)."},
    )
    whole_word_mask: bool = field(
        default=False, metadata={"help": "Select whole words rather than single tokens: every piece of a word the "
                                         "tokenizer's pre-tokenizer made is masked, replaced or kept together (fast "
                                         "tokenizers; WordPiece, BPE and SentencePiece alike)."}
    )
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Pad batches to a multiple of this length (8 suits tensor cores)."}
    )
    line_by_line: bool = field(
        default=False,
        metadata={"help": "One example per line (truncated to max_seq_length) instead of packing text into "
                          "blocks."},
    )
    pad_to_max_length: bool = field(
        default=False,
        metadata={"help": "With line_by_line: pad every example to max_seq_length (static shapes, e.g. for TPU) "
                          "instead of to the longest in the batch."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on at most this many examples (blocks), for quick runs."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on at most this many examples (blocks)."}
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Read, tokenize and pack the text on the fly instead of preparing it whole: for corpora "
                          "larger than the disk cache. Needs --max_steps; evaluates on --max_eval_samples "
                          "held-out blocks (default 512); each process tokenizes its own share."},
    )
    tokenized_dataset_path: str | None = field(
        default=None,
        metadata={"help": "Train on data prepared by `python -m utils.tools.prepare_dataset` (blocks + tokenizer + "
                          "manifest) instead of tokenizing here; a mismatch with the run is an error."},
    )
    fill_mask_sentences: list[str] | None = field(
        default=None,
        metadata={"help": "Sentences with [MASK] (or <mask>) to predict with the trained model at the end."},
    )
    fill_mask_top_k: int = field(default=5, metadata={"help": "Predictions shown per mask."})
    def __post_init__(self):
        # A single path from an args file arrives as a string.
        for name in ("train_file", "validation_file", "fill_mask_sentences"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        sources = [f"--{name}" for name in ("dataset_name", "train_file", "builtin_corpus") if getattr(self, name)]
        if len(sources) > 1:
            raise UsageError(f"{' and '.join(sources)} both name training data; keep one")
        if not sources and not self.validation_file and not self.tokenized_dataset_path:
            raise UsageError("no data given: pass --train_file, --dataset_name or --builtin_corpus")
        for name in ("train_file", "validation_file"):
            for path in getattr(self, name) or []:
                check_extension(path, name)
        if not 0 < self.mlm_probability < 1:
            raise UsageError(f"--mlm_probability {self.mlm_probability} must be between 0 and 1 (exclusive); "
                             "0.15 is BERT's, 0.3 suits large models")
        if self.eval_mlm_probability is not None and not 0 < self.eval_mlm_probability < 1:
            raise UsageError(f"--eval_mlm_probability {self.eval_mlm_probability} must be between 0 and 1 "
                             "(exclusive); leave it unset for 0.15")
        if self.max_predictions_per_seq is not None and self.max_predictions_per_seq < 1:
            raise UsageError(f"--max_predictions_per_seq {self.max_predictions_per_seq} must be at least 1 (BERT used "
                             "20 at 128 tokens)")
        for name in ("mask_replace_prob", "random_replace_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise UsageError(f"--{name} {getattr(self, name)} must be between 0 and 1")
        if self.mask_replace_prob + self.random_replace_prob > 1:
            raise UsageError(f"--mask_replace_prob {self.mask_replace_prob} + --random_replace_prob "
                             f"{self.random_replace_prob} exceeds 1")
        if not 0 <= self.validation_split_percentage < 100:
            raise UsageError(f"--validation_split_percentage {self.validation_split_percentage} must be in [0, 100)")
        if self.pad_to_max_length and not self.line_by_line:
            raise UsageError("--pad_to_max_length only applies with --line_by_line (blocks are always full); "
                             "add --line_by_line or drop it")
        if self.tokenized_dataset_path:
            for name in ("streaming", "line_by_line"):
                if getattr(self, name):
                    raise UsageError(f"--tokenized_dataset_path holds prepared blocks; --{name} does not apply, "
                                     "drop it")
        if self.streaming:
            for name in ("line_by_line", "whole_word_mask"):
                if getattr(self, name):
                    raise UsageError(f"--streaming packs blocks of token ids; --{name} is not supported with it, "
                                     "drop one of them")
            if self.builtin_corpus:
                raise UsageError("--builtin_corpus is small enough to load whole; drop --streaming")


@dataclass
class DownstreamCheckArguments:
    """After training, did it help? Fine-tune the starting point and the trained model on a labelled task, and compare.

    utils/tools/downstream.py does the comparison; `python -m utils.tools.downstream` runs it on any models.
    """

    downstream_train_file: list[str] | None = field(
        default=None, metadata={"help": "After training, fine-tune the starting checkpoint (from scratch: the same "
                                        "model untrained) and the trained model on this labelled data (csv, json, "
                                        "parquet) and compare them over seeds; the table goes into the model card."})
    downstream_validation_file: list[str] | None = field(
        default=None, metadata={"help": "Labelled data to score that comparison on."})
    downstream_builtin_task: str | None = field(
        default=None, metadata={"help": "python_packages: a labelled task built from this machine's Python "
                                        "docstrings (which package a paragraph comes from), instead of the files."})
    downstream_text_column_name: str | None = field(
        default=None, metadata={"help": "Its text column (unset: `text`, or the only text column)."})
    downstream_text_pair_column_name: str | None = field(default=None, metadata={"help": "Its second text column."})
    downstream_label_column_name: str = field(default="label", metadata={"help": "Its label column."})
    downstream_seeds: int = field(default=3, metadata={"help": "Fine-tuning runs per model (--seed, --seed + 1, ...)."})
    downstream_learning_rate: float = field(default=1e-4, metadata={"help": "Fine-tuning learning rate."})
    downstream_num_train_epochs: float = field(default=3.0, metadata={"help": "Fine-tuning epochs."})
    downstream_batch_size: int = field(default=32, metadata={"help": "Fine-tuning batch size per device."})

    def __post_init__(self):
        for name in ("downstream_train_file", "downstream_validation_file"):
            if isinstance(getattr(self, name), str):  # a single path from an args file
                setattr(self, name, [getattr(self, name)])

    @property
    def enabled(self) -> bool:
        return bool(self.downstream_builtin_task or self.downstream_train_file)


# The flags of run_mlm.py, in the order --help lists them (this project's before transformers').
ARGUMENT_GROUPS = (ModelArguments, DataTrainingArguments, DownstreamCheckArguments, TrainingArguments)


def precision_shapes(model_args, data_args, training_args) -> list[tuple[int, int, int]] | None:
    """The model's big matrix products for one training batch, to time bf16 against fp32 on a CPU."""
    if not Backend.of(training_args).times_precision or model_args.precision != "auto":
        return None
    config = modeling.load_config(model_args)
    tokens = training_args.per_device_train_batch_size * (data_args.max_seq_length or 128)
    return gemm_shapes(config, min(tokens, 8192))


def check_run_arguments(model_args, data_args, training_args) -> None:
    """Rules that span the argument groups."""
    if not (training_args.do_train or training_args.do_eval):
        raise UsageError("nothing to do: pass --do_train and/or --do_eval")
    if training_args.do_eval and not data_args.validation_file and data_args.validation_split_percentage == 0 \
            and data_args.dataset_name is None and not data_args.streaming and not data_args.tokenized_dataset_path:
        raise UsageError("--do_eval needs evaluation text: pass --validation_file or a "
                         "--validation_split_percentage above 0")
    if training_args.do_train and not (data_args.train_file or data_args.dataset_name or data_args.builtin_corpus
                                       or data_args.tokenized_dataset_path):
        raise UsageError("--do_train needs training text: pass --train_file, --dataset_name or --builtin_corpus")
    if data_args.streaming and training_args.do_train and training_args.max_steps <= 0 \
            and not model_args.max_train_time:
        raise UsageError("--streaming needs --max_steps or --max_train_time: a stream has no length to count epochs in")
    check_nonfinite_option(model_args.nonfinite_loss, deepspeed=training_args.deepspeed_plugin is not None)


@leaves_environment_as_found
def main(argv: list[str] | None = None, command_line: bool = False) -> dict:
    """Run one training: parse, load data, tokenize, build the model, train, evaluate, save. Returns the metrics.

    Bad input raises UsageError; run as a script, that becomes one `error:` line and exit
    status 2 (utils/errors.py lists the others). Called in-process (a notebook, the tests),
    the run leaves the process's settings as it found them; only the script
    (`command_line=True`) changes process-wide ones, such as how glibc's malloc keeps memory.
    """
    # 1. Arguments: an optional args file, then flags. Processes started on a machine without
    #    GPUs join one gloo group (set before TrainingArguments picks the device).
    distributed.join_cpu_process_group()
    parser = HfArgumentParser(ARGUMENT_GROUPS)
    configure_help(parser, __doc__)
    model_args, data_args, downstream_args, training_args = parse_args(parser, argv)
    check_run_arguments(model_args, data_args, training_args)
    distributed.check_process_group(training_args)
    move_hub_token_to_env(training_args)
    # From scratch, what the user did not set takes the measured recipe (utils/train/recipe.py).
    scratch_recipe = (recipe.apply_scratch_recipe(data_args, training_args, given_keys(argv))
                      if model_args.from_scratch and model_args.scratch_recipe else [])
    # What the user chose (and the recipe filled in), before the adjustments below: saved as an
    # args file that reruns the run.
    run_args = non_default_args(model_args, data_args, downstream_args, training_args)
    # A rerun of a run that reached its end changes nothing (it would resume and take a step
    # past the end, then report that step alone).
    finished = finished_run(training_args,
                            model_args.max_train_time and budget.parse_duration(model_args.max_train_time))
    if finished:
        if training_args.local_process_index == 0:
            print(finished, file=sys.stderr, flush=True)
        if command_line:
            distributed.leave_process_group()
        return {}

    # 2. Logging (one summary per process, details from the main process only), and where a
    #    run in output_dir left off: an explicit --resume_from_checkpoint, or its last checkpoint.
    setup_logging(training_args)
    threads = fit_cpu_threads(training_args)
    if threads:
        logger.info("CPU: %s", threads)
    checkpoint = find_resume_checkpoint(training_args)
    who = distributed.processes(training_args)
    stream_position = streaming.load_position(checkpoint, who.rank, who.world) if data_args.streaming else None

    # A time budget: the learning-rate schedule runs over the elapsed time and training stops
    # at the deadline (a resume goes on with the time its checkpoint recorded).
    time_budget = other_limit = None
    if model_args.max_train_time:
        time_budget = budget.TimeBudget(budget.parse_duration(model_args.max_train_time),
                                        budget.TimeBudget.load(checkpoint))
        other_limit = (f"step {training_args.max_steps}" if training_args.max_steps > 0
                       else f"{training_args.num_train_epochs:g} epochs" if "num_train_epochs" in given_keys(argv)
                       else None)

    # 3. The effective arguments, settled in one place (utils/train/effective_args.py): the precision
    #    (bf16 where it is faster on this hardware: on a CPU, timed at the model's own matrix
    #    shapes, once per machine), on XLA (TPU) the settings that keep shapes static so that
    #    the graph compiles once, the time budget's end, streaming's shards, the Trainer's
    #    settings for this pipeline. Logged once here, saved with the run.
    settled = effective_args.settle(
        model_args, data_args, training_args,
        tensorboard_default="report_to" not in given_keys(argv) and importlib.util.find_spec("tensorboard") is not None,
        time_budget_only=time_budget is not None and other_limit is None, stream_resumed=bool(stream_position),
        precision_shapes=precision_shapes(model_args, data_args, training_args),
        cache_dir=run_cache_dir(model_args.cache_dir))
    log_process(training_args)
    if xla.on_xla(training_args):
        logger.warning("XLA: %s", xla.nonfinite_check_note(model_args.nonfinite_loss))
    # What the user set, one per line (the rest are the defaults `--help` lists), then what this script changed.
    logger.info("Arguments (the others at their defaults):\n%s\nSet by this script (saved in %s):\n%s",
                "\n".join(f"  {name}: {value}" for name, value in run_args.items()),
                effective_args.EFFECTIVE_ARGS_FILE, settled.describe())
    if time_budget:
        logger.info("Time budget: %s", budget.describe(time_budget, training_args, other_limit))

    # 4. Seed everything before any random initialisation.
    set_seed(training_args.seed)

    modeling.check_block_length_early(model_args, data_args.max_seq_length)

    # 5. Raw text: hub dataset, local files, or a corpus built from this machine's files (none
    #    when training on data prepared ahead by utils/tools/prepare_dataset.py).
    raw_datasets = None
    if not data_args.tokenized_dataset_path:
        raw_datasets = pipeline.load_text(data_args, model_args, training_args)

    # 6. Tokenizer: the given one, the pretrained model's, the prepared data's, the checkpoint's,
    #    or one trained on the text.
    tokenizer, tokenizer_source = tokenizers.load_or_train_tokenizer(
        model_args, data_args, raw_datasets, checkpoint, training_args
    )
    segments = RunSegments(checkpoint, tokenizer_source)  # a resumed run's results cover the whole run
    tokenizer_source = segments.tokenizer_source
    blocks = manifest = None
    data_stats: dict = {}  # per split: tokens, characters, tokens lost (for the log and the model card)
    if data_args.tokenized_dataset_path:
        blocks, manifest = prepared.load_prepared(data_args.tokenized_dataset_path, tokenizer, data_args,
                                                  model_args.tokenizer_type)
        data_stats = manifest["splits"]

    # 7. Model configuration, and the block length it and the tokenizer can take.
    config, max_seq_length = modeling.config_and_block_length(
        model_args, tokenizer, manifest["block_size"] if manifest else data_args.max_seq_length
    )
    if model_args.from_scratch and model_args.scratch_recipe:
        scratch_recipe += [f"dropout 0 ({', '.join(names)})"
                           for names in [recipe.turn_dropout_off(config, model_args.config_overrides)] if names]
    if scratch_recipe:
        logger.info("From scratch, settings not given take this project's recipe (--scratch_recipe false for "
                    "transformers' defaults): %s", "; ".join(scratch_recipe))
    check_checkpoint_fits(checkpoint, config, training_args.output_dir)
    if data_args.whole_word_mask and not tokenizer.is_fast:
        raise UsageError("--whole_word_mask needs a fast tokenizer (its word ids); drop --use_fast_tokenizer false")

    # 8. Tokenize and pack into blocks (the main process first; the others read its cache), or
    #    stream them (each process its own share), or read the prepared blocks. Every text gets
    #    the ids tokenizer(text) gives, whatever padding its tokenizer.json holds. Then the
    #    collator: the Trainer masks each step's batches by (seed, step, row of the global batch)
    #    only, whatever the data loader's workers or a resume did. On XLA the sparse head has a
    #    fixed number of prediction slots per block, and the masking selects at most that many.
    backend = Backend.of(training_args)  # what differs on a CPU, a GPU, XLA
    on_xla = backend.xla
    slots = prediction_slots(data_args, max_seq_length, fixed_slot_head=on_xla and model_args.sparse_prediction)
    collator = build_collator(tokenizer, data_args, training_args, max_predictions=slots)
    train_dataset = eval_dataset = None
    if data_args.streaming:
        # A resume starts each share of the stream where the checkpoint says, instead of the
        # Trainer reading (and tokenizing) every batch it skips. Each process reads its own
        # shard of the stream (the default would have rank 0 read for all).
        position = stream_position
        train_dataset, eval_dataset = streaming.streaming_datasets(
            raw_datasets, tokenizer, data_args, max_seq_length, n_parts=who.world, do_eval=training_args.do_eval,
            start={who.rank: position} if position else None,
        )
        if position:
            distributed.process_logger.info(
                "Process %d of %d resumes its share of the stream at text %d, token %d (pass %d), from %s: the "
                "texts before it are skipped untokenized", who.rank, who.world, position[2], position[3],
                position[0] + 1, checkpoint)
        if who.world > 1 and raw_datasets is not None and "train" in raw_datasets:
            distributed.process_logger.info("Process %d of %d streams its own share of the training text: %s",
                                            who.rank, who.world,
                                            streaming.describe_share(raw_datasets["train"], who.rank, who.world))
    else:
        if blocks is None:
            with distributed.main_process_first(training_args, "tokenizing"):
                started = time.time()
                blocks = pipeline.preprocess_datasets(raw_datasets, tokenizer, data_args, max_seq_length,
                                                    stats=data_stats)
            pipeline.report_cache_reuse(blocks, started, training_args)
        if training_args.do_train:
            train_dataset = pipeline.truncate(blocks["train"], data_args.max_train_samples)
        if training_args.do_eval:
            if "validation" not in blocks:
                raise UsageError(f"--do_eval: {data_args.tokenized_dataset_path} has no validation split; prepare "
                                 "it with --validation_file or --validation_split_percentage, or drop --do_eval")
            eval_dataset = pipeline.truncate(blocks["validation"], data_args.max_eval_samples)
    if training_args.do_eval:
        # Masked once with a fixed seed: every evaluation scores the same positions.
        with distributed.main_process_first(training_args, "masking the evaluation set"):
            eval_dataset = mask_eval_dataset(eval_dataset, collator, training_args.seed)
        if collator.cap_report("eval"):
            logger.info("Evaluation masks: %s", collator.cap_report("eval"))
        if on_xla:
            full = xla.trim_to_full_batches(eval_dataset, training_args.per_device_eval_batch_size, who.world)
            logger.info("XLA: evaluating on %d of %d blocks (whole batches only)", len(full), len(eval_dataset))
            eval_dataset = full

    # 9. The model, with an MLM head that predicts masked positions only (on XLA, in a fixed
    #    number of slots per block: a number of masked tokens that changed with every batch
    #    would be a new graph to compile at every step).
    padded_rows = data_args.line_by_line and not data_args.pad_to_max_length  # rows of different lengths
    attention = modeling.choose_attention(model_args.attn_implementation, training_args, config, padded_rows)
    model = modeling.build_model(model_args, config, tokenizer, attention)
    logger.info("MLM head: %s", install_mlm_head(model, sparse=model_args.sparse_prediction,
                                                 slots=slots if on_xla else None))
    if backend.cpu_kernels:
        for change in speed_up_for_cpu(model, reuse_memory=command_line):
            logger.info("CPU: %s", change)
    untrained = None
    if downstream_args.enabled and training_args.do_train and model_args.from_scratch:
        # The baseline of "does pretraining help at all": this very model before any step.
        untrained = downstream.save_untrained(model, tokenizer, training_args)

    # All input is checked: from here on this run writes to output_dir, and no other run may.
    # The lock and the signal handlers are released however the run ends (an error included).
    with locked_output_dir(training_args.output_dir, training_args.should_save), GracefulStop() as stop_on_signal:
        # 10. Trainer: loss averaged over the global batch's masked tokens, accuracy counted per batch.
        #     A guard against nan/inf steps, and SIGTERM/SIGINT turned into "save, then stop".
        compilations = xla.CompilationCounter() if on_xla else None
        tokens_per_step = (training_args.per_device_train_batch_size * who.world
                           * training_args.gradient_accumulation_steps * max_seq_length)
        guard = compilations if compilations else NonFiniteGuard(model_args.nonfinite_loss)
        callbacks = [stop_on_signal, guard, *([time_budget] if time_budget else [])]
        trainer = build_trainer(model, tokenizer, training_args, train_dataset, eval_dataset, collator,
                                callbacks=callbacks, tokens_per_step=tokens_per_step)
        trainer.time_budget, trainer.segments = time_budget, segments
        if on_xla and xla.start_replicas_equal(trainer.model, who.world):
            logger.info("XLA: every replica starts from replica 0's weights")
        if data_args.streaming and training_args.ignore_data_skip and checkpoint:
            trainer.stream_resumed_from = checkpoint  # the stream starts where it stopped: no batches skipped
        sharded = distributed.shard_for_fsdp2(trainer)
        if sharded:
            logger.info(sharded)
        if trainer.is_deepspeed_enabled:
            logger.info("DeepSpeed: ZeRO stage %s", trainer.accelerator.state.deepspeed_plugin.zero_stage)

        # 11. Train, then save the model, tokenizer and training state.
        results = {}
        if training_args.do_train:
            train_result = trainer.train(resume_from_checkpoint=checkpoint)
            if stop_on_signal.stopped:
                if command_line:  # all processes stopped after the same step: leave together
                    distributed.leave_process_group()
                raise Interrupted(stop_on_signal.stopped, trainer.state.global_step, training_args.output_dir)
            save_final_model(trainer)
            # A stream has no length: count the blocks trained on instead.
            train_samples = (trainer.state.global_step * tokens_per_step // max_seq_length if data_args.streaming
                             else len(train_dataset))
            train_metrics = segments.whole_run(dict(train_result.metrics, train_samples=train_samples),
                                               trainer.state.global_step)
            if time_budget:  # from every process: they stopped after the same step
                distributed.process_logger.info("Process %d of %d, time budget: %s", who.rank, who.world,
                                                time_budget.summary())
                train_metrics.update(time_budget.metrics())
            trainer.log_metrics("train", train_metrics)
            trainer.save_metrics("train", train_metrics)
            trainer.save_state()
            results.update(train_metrics)
            if collator.cap_report("train"):
                logger.info("Training masks: %s", collator.cap_report("train"))
            checksums.log_replica_checksums(trainer, tokenizer)

        # 12. Evaluate: loss, perplexity and masked-token accuracy.
        if training_args.do_eval:
            eval_metrics = trainer.evaluate()
            if compilations is not None and trainer.is_world_process_zero():
                compilations.save(training_args.output_dir)
            eval_metrics["perplexity"] = metrics.perplexity(eval_metrics["eval_loss"])
            eval_metrics["eval_samples"] = len(eval_dataset)
            trainer.log_metrics("eval", eval_metrics)
            trainer.save_metrics("eval", eval_metrics)
            results.update(eval_metrics)

        # 13. Fill-mask predictions with the trained model, then the loss plot, the model card
        #     (which shows them) and the run's arguments (an args file that reruns it).
        predictions = None
        if data_args.fill_mask_sentences:
            # Every process runs the model: a sharded one (FSDP, ZeRO-3) gathers its weights
            # from all of them. The first prints.
            predictions = predict_masks(trainer.model, tokenizer, data_args.fill_mask_sentences,
                                        data_args.fill_mask_top_k)
            if trainer.is_world_process_zero():
                print("\nFill-mask predictions:\n" + format_predictions(data_args.fill_mask_sentences, predictions),
                      flush=True)
        if training_args.do_train and trainer.is_world_process_zero():
            try:
                plot = plot_run(training_args.output_dir).name
            except UsageError as e:  # a run shorter than --logging_steps has no curve to draw
                logger.info("No loss plot: %s", e)
                plot = None
            write_run_args(training_args.output_dir, run_args)
            effective_args.save(training_args.output_dir, settled, model_args, data_args, downstream_args,
                                training_args)
            write_model_card(
                training_args.output_dir, trainer.model, model_args, data_args, training_args, trainer.state, results,
                max_seq_length, tokenizer_source, tokenizer.mask_token, sys.argv[1:] if argv is None else argv,
                tokens_per_step=tokens_per_step, plot=plot, data_stats=data_stats,
                fill_mask=(data_args.fill_mask_sentences, predictions) if predictions else None,
            )

        # 14. Did it help? Fine-tune the starting point and the trained model on a labelled task,
        #     over seeds; the table goes into the model card.
        if downstream_args.enabled and training_args.do_train:
            summary = downstream.compare_after_training(
                model_args.model_name_or_path or untrained, training_args.output_dir, downstream_args,
                data_args.max_seq_length, training_args, command_line)
            results["downstream"] = {name: entry["accuracy_mean"] for name, entry in summary.items()
                                     if name not in ("task", "hyperparameters")}

    # 15. Done: leave the process group now rather than in the interpreter's shutdown.
    if command_line:
        distributed.leave_process_group()
    return results


if __name__ == "__main__":
    exit_on_usage_error(main)(command_line=True)
