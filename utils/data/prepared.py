"""Data tokenized and packed ahead (utils/tools/prepare_dataset.py writes it): the directory, its manifest, checks.

The directory holds one folder of Arrow shards per split (`datasets.load_from_disk`
reads them memory-mapped), the tokenizer, and `manifest.json`: tokenizer fingerprint,
block size, token and character counts and the data it came from. A run refuses a
directory whose tokenizer, block size or source differs from its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from utils.data.encoding import exact_copy
from utils.data.tokenizer_kinds import kind_of
from utils.errors import UsageError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
# 2: ids exactly as `tokenizer(text)` gives them (format 1 kept the padding and truncation a
# tokenizer.json may carry), token and character counts per split.
FORMAT_VERSION = 2


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of everything that decides token ids: the fast tokenizer's full JSON, else the vocabulary.

    Taken on the exact copy that tokenizes the data (no padding or truncation): the padding
    state of a tokenizer object changes with every wrapper call and decides no id.
    """
    backend = getattr(exact_copy(tokenizer), "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def data_source(data_args) -> dict:
    """The arguments that decide which text a prepared dataset holds (compared on reuse)."""
    names = ("dataset_name", "dataset_config_name", "train_file", "validation_file", "builtin_corpus",
             "text_column_name", "validation_split_percentage", "whole_word_mask")
    return {name: getattr(data_args, name) for name in names}


def write_prepared(path: str, datasets, tokenizer, block_size: int, data_args, stats: dict,
                   max_shard_size: str = "500MB", overwrite: bool = False) -> dict:
    """Save `datasets` (blocks), the tokenizer and a manifest to `path`, atomically. Returns the manifest."""
    target = Path(path)
    check_target(path, overwrite)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    datasets.save_to_disk(str(tmp), max_shard_size=max_shard_size)
    tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
    import datasets as hf_datasets
    import transformers

    manifest = {
        "format_version": FORMAT_VERSION,
        "block_size": block_size,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "tokenizer_kind": kind_of(tokenizer),
        "vocab_size": len(tokenizer),
        "columns": datasets[next(iter(datasets))].column_names,
        # tokens: what the text gave; tokens_in_blocks: what training sees (less the last partial block).
        "splits": {split: {"blocks": len(ds),
                           "tokens": stats.get(split, {}).get("tokens", len(ds) * block_size),
                           "tokens_in_blocks": len(ds) * block_size,
                           "tokens_lost": stats.get(split, {}).get("tokens_lost", 0),
                           "characters": stats.get(split, {}).get("characters")}
                   for split, ds in datasets.items()},
        "source": data_source(data_args),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"datasets": hf_datasets.__version__, "transformers": transformers.__version__},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return manifest


def check_target(path: str, overwrite: bool) -> None:
    """Refuse to write over a non-empty directory, unless asked to and it is a prepared dataset."""
    target = Path(path)
    if target.exists() and any(target.iterdir()):
        if not overwrite:
            raise UsageError(f"--tokenized_dataset_path {path} is not empty; pass --overwrite to replace it "
                             "or choose another directory")
        if not (target / MANIFEST).exists():
            raise UsageError(f"--tokenized_dataset_path {path} holds files that are not a prepared dataset; "
                             "refusing to delete them, choose another directory")


def read_manifest(path: str) -> dict:
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.exists():
        what = "does not exist" if not Path(path).exists() else f"has no {MANIFEST}"
        raise UsageError(f"--tokenized_dataset_path {path} {what}; write it with "
                         f"`python -m utils.tools.prepare_dataset ARGS --tokenized_dataset_path {path}`")
    try:
        return json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"--tokenized_dataset_path {path}: {MANIFEST} is not valid JSON ({e}); "
                         "prepare it again") from e


def check_manifest(manifest: dict, path: str, tokenizer, data_args) -> None:
    """Refuse a prepared dataset that does not fit the run: another tokenizer, block size or source."""
    redo = f"prepare it again with this run's arguments, or use the tokenizer in {path}/{TOKENIZER_DIR}"
    if manifest.get("format_version") == 1:
        # Format 1 tokenized with the backend as saved: a tokenizer.json that pads or truncates
        # (sentence-transformers') gave one padded, cut row per text. Without that, its ids are exact.
        padded = saved_padding(Path(path) / TOKENIZER_DIR)
        if padded:
            raise UsageError(f"--tokenized_dataset_path {path} was prepared by an earlier version that kept its "
                             f"tokenizer's own padding and truncation ({padded}): its blocks hold padding and cut "
                             "texts, not the text's tokens; prepare it again "
                             "(python -m utils.tools.prepare_dataset ... --overwrite)")
    elif manifest.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"--tokenized_dataset_path {path} was written by another version of prepare_dataset "
                         f"(format {manifest.get('format_version')}, this one reads {FORMAT_VERSION}); prepare "
                         "it again")
    fingerprint = tokenizer_fingerprint(tokenizer)
    if fingerprint != manifest["tokenizer_fingerprint"]:
        raise UsageError(f"--tokenized_dataset_path {path} was tokenized with another tokenizer (fingerprint "
                         f"{manifest['tokenizer_fingerprint']}, this run's is {fingerprint}); " + redo)
    if data_args.max_seq_length is not None and data_args.max_seq_length != manifest["block_size"]:
        raise UsageError(f"--max_seq_length {data_args.max_seq_length} differs from the block size "
                         f"{manifest['block_size']} of --tokenized_dataset_path {path}; drop --max_seq_length "
                         "or prepare the data again with it")
    if data_args.whole_word_mask and "word_starts" not in manifest["columns"]:
        raise UsageError(f"--whole_word_mask needs the word starts, which --tokenized_dataset_path {path} does not "
                         "hold; prepare it again with --whole_word_mask")
    given = {k: v for k, v in data_source(data_args).items()
             if k in ("dataset_name", "dataset_config_name", "train_file", "validation_file", "builtin_corpus")
             and v is not None}
    prepared = {k: manifest["source"].get(k) for k in given}
    if given != prepared:
        changed = ", ".join(f"--{k} {given[k]} (prepared from {prepared[k]})" for k in given if given[k] != prepared[k])
        raise UsageError(f"--tokenized_dataset_path {path} was prepared from other data: {changed}; "
                         "drop the data flags to train on the prepared data, or prepare it again")


def saved_padding(tokenizer_dir: Path) -> str | None:
    """The padding and truncation a saved tokenizer.json applies on its own, in a phrase; None if none."""
    tokenizer_json = tokenizer_dir / "tokenizer.json"
    if not tokenizer_json.exists():
        return None
    saved = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    what = [f"{key} {json.dumps(saved[key])}" for key in ("padding", "truncation") if saved.get(key)]
    return ", ".join(what) or None


def load_prepared(path: str, tokenizer, data_args, tokenizer_type: str = "auto"):
    """The prepared splits (memory-mapped) after checking the manifest against the run, and the manifest.

    `tokenizer_type`: the run's --tokenizer_type; anything but auto must be the prepared data's kind.
    """
    from datasets import load_from_disk

    manifest = read_manifest(path)
    prepared_kind = manifest.get("tokenizer_kind") or kind_of(tokenizer)
    if tokenizer_type != "auto" and prepared_kind != tokenizer_type:
        raise UsageError(f"--tokenizer_type {tokenizer_type}: --tokenized_dataset_path {path} was tokenized with a "
                         f"{prepared_kind} tokenizer; drop --tokenizer_type, or prepare the data again with it")
    check_manifest(manifest, path, tokenizer, data_args)
    datasets = load_from_disk(path)
    logger.info("Prepared data %s: %s", path, ", ".join(
        f"{split} {info['blocks']} blocks ({info['tokens']:,} tokens)" for split, info in manifest["splits"].items()))
    return datasets, manifest


def load_prepared_tokenizer(path: str):
    from transformers import AutoTokenizer

    read_manifest(path)
    return AutoTokenizer.from_pretrained(Path(path) / TOKENIZER_DIR)
