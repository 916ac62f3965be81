#!/usr/bin/env python
"""Train a masked language model (BERT-style MLM) from scratch, or adapt a pretrained one to your text.

Arguments come from an args file (YAML or JSON), flags, or both; flags after the file win:

    # the quickstart: a small BERT from scratch, offline, on 2 CPU cores in a few minutes
    accelerate launch --config_file accelerate_configs/cpu.yaml run_mlm.py configs/quickstart.yaml

    # adapt a pretrained checkpoint to your own files
    accelerate launch --config_file accelerate_configs/cpu.yaml run_mlm.py \\
        --model_name_or_path bert-base-uncased --train_file my_corpus.txt \\
        --do_train --do_eval --output_dir outputs/my-bert

    # any args file, with overrides
    python run_mlm.py configs/quickstart.yaml --max_steps 50 --output_dir outputs/short

Every `transformers.TrainingArguments` flag is accepted too. `python run_mlm.py --help` lists them all.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
from dataclasses import dataclass, field

from transformers import HfArgumentParser, TrainingArguments, set_seed

from utils import data, distributed, metrics, modeling, xla
from utils import tokenizer as tokenizers
from utils.args import given_keys, move_hub_token_to_env, parse_args
from utils.checkpoints import find_resume_checkpoint
from utils.corpus import BUILTIN_CORPORA, build_corpus
from utils.cpu import speed_up_for_cpu
from utils.data import check_extension
from utils.errors import UsageError, exit_on_usage_error
from utils.fill_mask import format_predictions, predict_masks
from utils.logs import setup_logging
from utils.masking import build_collator, mask_eval_dataset
from utils.mlm_head import install_mlm_head
from utils.model_card import non_default_args, write_model_card, write_run_args
from utils.modeling import MLM_MODEL_TYPES
from utils.plot_metrics import plot_run
from utils.precision import apply_precision
from utils.training import build_trainer, checkpoint_step

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
                          "tokenizer, a WordPiece tokenizer is trained on the training text."},
    )
    tokenizer_vocab_size: int = field(
        default=30522, metadata={"help": "Vocabulary size of the WordPiece tokenizer trained from scratch."}
    )
    tokenizer_lowercase: bool = field(
        default=True, metadata={"help": "Whether the tokenizer trained from scratch lowercases text (uncased)."}
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
    sparse_prediction: bool = field(
        default=True,
        metadata={"help": "Run the MLM head on the masked positions only: the same loss for a fraction of the "
                          "compute (BERT, RoBERTa, XLM-R, DistilBERT, ALBERT, ELECTRA, ModernBERT; other "
                          "models fall back to the dense head). --sparse_prediction false for the dense head."},
    )
    attn_implementation: str = field(
        default="auto",
        metadata={"help": "Attention kernel. auto: FlashAttention-2 on a CUDA GPU in bf16/fp16 when flash_attn is "
                          "installed, else the model's default (SDPA).",
                  "choices": ["auto", "sdpa", "eager", "flash_attention_2"]},
    )
    precision: str = field(
        default="auto",
        metadata={"help": "Training precision. auto: bf16 mixed precision where the hardware has bf16 units "
                          "(TPU, Ampere+ GPU, CPU with AMX or AVX512-BF16), unless --bf16/--fp16 or the "
                          "accelerate config chose; else fp32.",
                  "choices": ["auto", "bf16", "fp16", "fp32"]},
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
        default=0.15, metadata={"help": "Fraction of tokens selected for prediction, in (0, 1)."}
    )
    mask_replace_prob: float = field(
        default=0.8, metadata={"help": "Of the selected tokens, the fraction replaced by the mask token."}
    )
    random_replace_prob: float = field(
        default=0.1,
        metadata={"help": "Of the selected tokens, the fraction replaced by a random token (the rest stay)."},
    )
    whole_word_mask: bool = field(
        default=False, metadata={"help": "Select whole words rather than single tokens (fast tokenizers only)."}
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
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset instead of loading it whole."})
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
        if not sources and not self.validation_file:
            raise UsageError("no data given: pass --train_file, --dataset_name or --builtin_corpus")
        for name in ("train_file", "validation_file"):
            for path in getattr(self, name) or []:
                check_extension(path, name)
        if not 0 < self.mlm_probability < 1:
            raise UsageError(f"--mlm_probability {self.mlm_probability} must be between 0 and 1 (exclusive); "
                             "0.15 is BERT's, 0.3 suits large models")
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
        if self.streaming:
            raise UsageError("--streaming is not supported yet; load the dataset whole (drop --streaming)")


def check_run_arguments(model_args, data_args, training_args) -> None:
    """Rules that span the argument groups."""
    if not (training_args.do_train or training_args.do_eval):
        raise UsageError("nothing to do: pass --do_train and/or --do_eval")
    if training_args.do_eval and not data_args.validation_file and data_args.validation_split_percentage == 0 \
            and data_args.dataset_name is None:
        raise UsageError("--do_eval needs evaluation text: pass --validation_file or a "
                         "--validation_split_percentage above 0")
    if training_args.do_train and not (data_args.train_file or data_args.dataset_name or data_args.builtin_corpus):
        raise UsageError("--do_train needs training text: pass --train_file, --dataset_name or --builtin_corpus")


def main(argv: list[str] | None = None) -> dict:
    """Run one training: parse, load data, tokenize, build the model, train, evaluate, save. Returns the metrics.

    Bad input raises UsageError; run as a script, that becomes one `error:` line and exit status 2.
    """
    # 1. Arguments: an optional args file, then flags. Processes started on a machine without
    #    GPUs join one gloo group (set before TrainingArguments picks the device).
    distributed.join_cpu_process_group()
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parse_args(parser, argv)
    check_run_arguments(model_args, data_args, training_args)
    distributed.check_process_group(training_args)
    move_hub_token_to_env(training_args)
    # What the user chose, before the adjustments below: saved as an args file that reruns the run.
    run_args = non_default_args(model_args, data_args, training_args)
    if "report_to" not in given_keys(argv) and importlib.util.find_spec("tensorboard") is not None:
        training_args.report_to = ["tensorboard"]  # on by default when installed (--report_to none to turn off)

    # 2. Precision (bf16 where the hardware has it), logging (one summary per process, details
    #    from the main process only), and on XLA (TPU) the settings that keep shapes static,
    #    so that the graph compiles once.
    apply_precision(training_args, model_args.precision)
    setup_logging(training_args)
    if xla.on_xla(training_args):
        for change in xla.adapt_for_xla(training_args, data_args):
            logger.info("XLA: set %s", change)
    logger.info("Model arguments %s", model_args)
    logger.info("Data arguments %s", data_args)

    # 3. Resume: an explicit --resume_from_checkpoint, or the last checkpoint in output_dir.
    checkpoint = find_resume_checkpoint(training_args)

    # 4. Seed everything before any random initialisation.
    set_seed(training_args.seed)

    # 5. Raw text: hub dataset, local files, or a corpus built from this machine's files.
    train_files = None
    if data_args.builtin_corpus:
        with distributed.main_process_first(training_args, "building the corpus"):
            train_files = [str(build_corpus(data_args.builtin_corpus, model_args.cache_dir))]
    raw_datasets = data.load_raw_datasets(data_args, model_args, train_files)

    # 6. Tokenizer: the given one, the pretrained model's, the checkpoint's, or one trained on the text.
    tokenizer, tokenizer_source = tokenizers.load_or_train_tokenizer(
        model_args, data_args, raw_datasets, checkpoint, training_args
    )

    # 7. Model configuration, and the block length it and the tokenizer can take.
    config = modeling.load_config(model_args)
    if model_args.from_scratch:
        modeling.fit_config_to_tokenizer(config, tokenizer)
    max_seq_length = modeling.resolve_max_seq_length(
        data_args.max_seq_length, tokenizer, config, model_args.from_scratch, model_args.config_overrides
    )
    if data_args.whole_word_mask and not tokenizer.is_fast:
        raise UsageError("--whole_word_mask needs a fast tokenizer (offsets); drop --use_fast_tokenizer false")

    # 8. Tokenize and group into blocks (the main process first; the others read its cache), and
    #    the masking collator, whose masks depend on (seed, step, row of the global batch) only.
    with distributed.main_process_first(training_args, "tokenizing"):
        started = time.time()
        lm_datasets = data.preprocess_datasets(raw_datasets, tokenizer, data_args, max_seq_length)
    distributed.report_cache_reuse(lm_datasets, started, training_args)
    collator = build_collator(tokenizer, data_args, training_args, start_step=checkpoint_step(checkpoint))
    train_dataset = eval_dataset = None
    if training_args.do_train:
        train_dataset = data.truncate(lm_datasets["train"], data_args.max_train_samples)
    if training_args.do_eval:
        # Masked once with a fixed seed: every evaluation scores the same positions.
        with distributed.main_process_first(training_args, "masking the evaluation set"):
            eval_dataset = mask_eval_dataset(
                data.truncate(lm_datasets["validation"], data_args.max_eval_samples), collator, training_args.seed
            )
        if xla.on_xla(training_args):
            full = xla.trim_to_full_batches(eval_dataset, training_args.per_device_eval_batch_size,
                                            training_args.world_size)
            logger.info("XLA: evaluating on %d of %d blocks (whole batches only)", len(full), len(eval_dataset))
            eval_dataset = full

    # 9. The model, with an MLM head that predicts masked positions only (not on XLA, where the
    #    changing number of masked tokens would recompile the graph every step).
    model = modeling.build_model(
        model_args, config, tokenizer, modeling.choose_attention(model_args.attn_implementation, training_args)
    )
    sparse = model_args.sparse_prediction and not xla.on_xla(training_args)
    logger.info("MLM head: %s", install_mlm_head(model, sparse=sparse))
    if training_args.device.type == "cpu":
        for change in speed_up_for_cpu(model):
            logger.info("CPU: %s", change)

    # 10. Trainer: loss averaged over the global batch's masked tokens, accuracy counted per batch.
    compilations = xla.CompilationCounter() if xla.on_xla(training_args) else None
    tokens_per_step = (training_args.per_device_train_batch_size * training_args.world_size
                       * training_args.gradient_accumulation_steps * max_seq_length)
    trainer = build_trainer(model, tokenizer, training_args, train_dataset, eval_dataset, collator,
                            callbacks=[compilations] if compilations else None, tokens_per_step=tokens_per_step)

    # 11. Train, then save the model, tokenizer and training state.
    results = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        train_metrics = dict(train_result.metrics, train_samples=len(train_dataset))
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        results.update(train_metrics)
        distributed.log_replica_checksums(trainer, tokenizer)

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

    # 13. The loss plot, the model card and the run's arguments (an args file that reruns it),
    #     then fill-mask predictions with the trained model.
    if training_args.do_train and trainer.is_world_process_zero():
        try:
            plot = plot_run(training_args.output_dir).name
        except UsageError as e:  # a run shorter than --logging_steps has no curve to draw
            logger.info("No loss plot: %s", e)
            plot = None
        write_run_args(training_args.output_dir, run_args)
        write_model_card(
            training_args.output_dir, trainer.model, model_args, data_args, training_args, trainer.state, results,
            max_seq_length, tokenizer_source, tokenizer.mask_token, sys.argv[1:] if argv is None else argv,
            tokens_per_step=tokens_per_step, plot=plot,
        )
    if data_args.fill_mask_sentences and trainer.is_world_process_zero():
        predictions = predict_masks(trainer.model, tokenizer, data_args.fill_mask_sentences,
                                    data_args.fill_mask_top_k)
        print("\nFill-mask predictions:\n" + format_predictions(data_args.fill_mask_sentences, predictions),
              flush=True)
    return results


if __name__ == "__main__":
    exit_on_usage_error(main)()
