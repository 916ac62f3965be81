"""Datasets: load raw text (hub, local files or a builtin corpus), tokenize, group into blocks."""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterable

import numpy as np
from datasets import Dataset, DatasetDict, load_dataset

from utils.errors import UsageError, one_line

logger = logging.getLogger(__name__)

# File extension -> `datasets` builder. Compressed variants (.gz, .bz2, .xz, .zst) are
# decompressed by `datasets` on the fly.
BUILDERS = {"txt": "text", "text": "text", "csv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}
COMPRESSIONS = ("gz", "bz2", "xz", "zst")


def file_extension(path: str) -> str:
    """The data extension of `path`, looking through one compression suffix ("a.txt.gz" -> "txt")."""
    parts = os.path.basename(path).lower().split(".")
    if len(parts) > 2 and parts[-1] in COMPRESSIONS:
        parts = parts[:-1]
    return parts[-1] if len(parts) > 1 else ""


def check_extension(path: str, flag: str) -> str:
    """Return the `datasets` builder for `path`, or raise a UsageError naming `flag`."""
    extension = file_extension(path)
    if extension not in BUILDERS:
        raise UsageError(
            f"--{flag} {path}: unsupported extension {('.' + extension) if extension else '(none)'}; "
            f"use one of {', '.join('.' + e for e in BUILDERS)} (optionally compressed with "
            f"{', '.join('.' + c for c in COMPRESSIONS)})"
        )
    return BUILDERS[extension]


def resolve_data_files(patterns: Iterable[str], flag: str) -> tuple[str, list[str]]:
    """Expand paths and globs given to `flag`; check that they exist, are non-empty and share one format.

    Returns the `datasets` builder name and the sorted list of files.
    """
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            what = "matches no file" if glob.has_magic(pattern) else "does not exist"
            raise UsageError(f"--{flag} {pattern} {what}")
        files.extend(m for m in matches if os.path.isfile(m))
    if not files:
        raise UsageError(f"--{flag} {' '.join(patterns)} names no regular file")
    builders = {check_extension(f, flag) for f in files}
    if len(builders) > 1:
        raise UsageError(f"--{flag} mixes file formats ({', '.join(sorted(builders))}); give files of one format")
    for f in files:
        if os.path.getsize(f) == 0:
            raise UsageError(f"--{flag} {f} is empty")
    return builders.pop(), files


def load_raw_datasets(data_args, model_args, train_files: list[str] | None = None) -> DatasetDict:
    """Load the raw text splits from the hub or from local files.

    `train_files` overrides `data_args.train_file` (used for builtin corpora). A missing
    validation split is cut from the head of the training split
    (`validation_split_percentage`), as the reference does.
    """
    common = {"cache_dir": model_args.cache_dir, "token": model_args.token}
    if data_args.dataset_name is not None:
        try:
            raw = load_dataset(
                data_args.dataset_name,
                data_args.dataset_config_name,
                streaming=data_args.streaming,
                **common,
            )
        except (ConnectionError, FileNotFoundError, ValueError) as e:
            offline = " (offline: HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set)" if _offline() else ""
            raise UsageError(f"--dataset_name {data_args.dataset_name}: cannot load the dataset{offline}: "
                             f"{one_line(e)}") from e
    else:
        raw = DatasetDict()
        for split, patterns, flag in (
            ("train", train_files or data_args.train_file, "train_file"),
            ("validation", data_args.validation_file, "validation_file"),
        ):
            if patterns:
                builder, files = resolve_data_files(patterns, flag)
                raw[split] = load_dataset(builder, data_files=files, split="train", **common)
    if "validation" not in raw and "train" in raw and data_args.validation_split_percentage > 0:
        raw["validation"], raw["train"] = split_off_validation(raw["train"], data_args.validation_split_percentage)
    return raw


def _offline() -> bool:
    from datasets import config

    return bool(config.HF_HUB_OFFLINE)


def split_off_validation(dataset: Dataset, percentage: float) -> tuple[Dataset, Dataset]:
    """Split `dataset` into (first `percentage`%, the rest), keeping order."""
    n_validation = max(1, int(len(dataset) * percentage / 100))
    if n_validation >= len(dataset):
        raise UsageError(
            f"--validation_split_percentage {percentage} leaves no training text in a dataset of "
            f"{len(dataset)} rows; lower it or pass --validation_file"
        )
    return dataset.select(range(n_validation)), dataset.select(range(n_validation, len(dataset)))


def find_text_column(column_names: list[str], features, requested: str | None) -> str:
    """Choose the column that holds the text: `requested`, else "text", else the only string column."""
    if requested is not None:
        if requested not in column_names:
            raise UsageError(f"--text_column_name {requested!r} is not a column; the columns are {column_names}")
        return requested
    if "text" in column_names:
        return "text"
    string_columns = [c for c in column_names if getattr(features.get(c), "dtype", None) in ("string", "large_string")]
    if len(string_columns) == 1:
        return string_columns[0]
    raise UsageError(
        f"no 'text' column and {len(string_columns) or 'no'} string columns in {column_names}; "
        "name the column with --text_column_name"
    )


def _non_blank(texts: list[str]) -> list[str]:
    return [t for t in texts if t and not t.isspace()]


def tokenize_texts(examples: dict, tokenizer, text_column: str, with_offsets: bool = False) -> dict:
    """Tokenize every non-blank text with its special tokens, keeping only what training needs."""
    encoded = tokenizer(
        _non_blank(examples[text_column]),
        return_attention_mask=False,
        return_token_type_ids=False,
        return_offsets_mapping=with_offsets,
        verbose=False,  # texts longer than the model are fine here: group_texts cuts them
    )
    return dict(encoded)


def tokenize_lines(
    examples: dict, tokenizer, text_column: str, max_seq_length: int, pad: bool, with_offsets: bool = False
) -> dict:
    """Tokenize each non-blank line as one example, truncated to `max_seq_length` (line_by_line mode)."""
    encoded = tokenizer(
        _non_blank(examples[text_column]),
        truncation=True,
        max_length=max_seq_length,
        padding="max_length" if pad else False,
        # Padded rows need their mask stored; unpadded rows get one from the collator.
        return_attention_mask=pad,
        return_token_type_ids=False,
        return_offsets_mapping=with_offsets,
    )
    return dict(encoded)


def group_texts(examples: dict, block_size: int) -> dict:
    """Concatenate each column's sequences and cut them into blocks of `block_size` tokens.

    The tail shorter than one block is dropped. Token ids are stored as int32 (half of
    the default int64), which holds any vocabulary.
    """
    grouped = {}
    for column, sequences in examples.items():
        if not sequences:
            return {c: [] for c in examples}
        flat = np.concatenate([np.asarray(s, dtype=np.int32) for s in sequences])
        n_blocks = len(flat) // block_size
        grouped[column] = flat[: n_blocks * block_size].reshape(n_blocks, block_size, *flat.shape[1:])
    return grouped


def preprocess_datasets(raw: DatasetDict, tokenizer, data_args, max_seq_length: int) -> DatasetDict:
    """Tokenize `raw` and turn it into training examples (fixed blocks, or one per line).

    Results go to the `datasets` cache: run it on the main process first, and the others
    read the cache instead of tokenizing again.
    """
    text_column = find_text_column(raw["train" if "train" in raw else "validation"].column_names,
                                   raw["train" if "train" in raw else "validation"].features,
                                   data_args.text_column_name)
    with_offsets = data_args.whole_word_mask
    map_kwargs = {
        "batched": True,
        "num_proc": data_args.preprocessing_num_workers,
        "load_from_cache_file": not data_args.overwrite_cache,
    }
    processed = DatasetDict()
    for split, dataset in raw.items():
        if data_args.line_by_line:
            processed[split] = dataset.map(
                tokenize_lines,
                fn_kwargs={"tokenizer": tokenizer, "text_column": text_column, "max_seq_length": max_seq_length,
                           "pad": data_args.pad_to_max_length, "with_offsets": with_offsets},
                remove_columns=dataset.column_names,
                desc=f"Tokenizing {split} lines",
                **map_kwargs,
            )
        else:
            tokenized = dataset.map(
                tokenize_texts,
                fn_kwargs={"tokenizer": tokenizer, "text_column": text_column, "with_offsets": with_offsets},
                remove_columns=dataset.column_names,
                desc=f"Tokenizing {split}",
                **map_kwargs,
            )
            processed[split] = tokenized.map(
                group_texts,
                fn_kwargs={"block_size": max_seq_length},
                desc=f"Grouping {split} into blocks of {max_seq_length}",
                **map_kwargs,
            )
        if len(processed[split]) == 0:
            raise UsageError(
                f"the {split} split has fewer tokens than one block of {max_seq_length} "
                f"(--max_seq_length); give more text or a smaller --max_seq_length"
            )
    return processed


def truncate(dataset: Dataset, max_samples: int | None) -> Dataset:
    """The first `max_samples` examples of `dataset` (all of them when None)."""
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    return dataset.select(range(max_samples))
