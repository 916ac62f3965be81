"""Tokenizers: load a pretrained one, or train the kind the model family uses on the training text."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from datasets import IterableDataset
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from utils.data.tokenizer_kinds import KIND_NAMES, choose, unknown_rate
from utils.errors import UsageError, one_line

logger = logging.getLogger(__name__)

# With --streaming, a tokenizer trained from scratch learns from the first this many characters.
STREAM_SAMPLE_CHARS = 200_000_000

def train_wordpiece_tokenizer(
    texts: Iterator[list[str]] | Iterator[str], vocab_size: int, lowercase: bool = True, model_max_length: int = 512
) -> PreTrainedTokenizerFast:
    """Train a BERT WordPiece tokenizer ([CLS] text [SEP], BertTokenizer) on `texts` (strings or batches of them)."""
    from utils.data.tokenizer_kinds import train_tokenizer

    return train_tokenizer(texts, "bert", "wordpiece", vocab_size, lowercase, model_max_length)


def _text_batches(dataset, text_column: str, max_chars: int = STREAM_SAMPLE_CHARS,
                  batch_size: int = 1000) -> Iterator[list[str]]:
    """Batches of non-blank texts to train a tokenizer on: at most about `max_chars` characters, taken evenly.

    A bounded sample: memory and time stay flat on a multi-GB corpus (the trainer's word
    counts grow with the text it reads), and every part of the corpus is represented.
    """
    from utils.data.pipeline import count_characters

    total = count_characters(dataset, text_column)
    stride = max(1, -(-total // max_chars))
    if stride > 1:
        logger.info("Training the tokenizer on every %d-th batch of 1000 texts (%.0f of %.0f MB of text)",
                    stride, total / stride / 1e6, total / 1e6)
    for i, batch in enumerate(dataset.iter(batch_size=batch_size)):
        if i % stride == 0:
            yield [t for t in batch[text_column] if t and not t.isspace()]


def train_or_load_cached_tokenizer(
    train_dataset, text_column: str, vocab_size: int, lowercase: bool | None, model_max_length: int,
    cache_root: Path, model_type: str | None = None, kind: str = "auto",
) -> PreTrainedTokenizerFast:
    """Train the tokenizer `model_type`'s family uses (or `kind`) on `train_dataset`, or reuse the same one.

    The cache (keyed on the dataset's fingerprint and the settings) lets the other
    processes of a distributed run, and reruns, load the tokenizer the main process trained.
    That matters beyond speed: training twice on the same text can give different
    vocabularies (tie-breaking in hash-map order, huggingface/tokenizers#1794). The
    tokenizer returned is the one loaded back from the cache: what any later load gives.
    """
    from utils.data.tokenizer_kinds import train_tokenizer

    kind, lowercase, class_name = choose(model_type, kind, lowercase)
    key = f"{train_dataset._fingerprint}-{text_column}-{vocab_size}-{lowercase}-{model_max_length}-{kind}-{class_name}"
    directory = cache_root / "tokenizers" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (directory / "tokenizer.json").exists():
        logger.info("Reusing the tokenizer trained earlier on the same data: %s", directory)
        return AutoTokenizer.from_pretrained(directory)
    logger.info("Training a %s tokenizer (%s, vocab %d, lowercase=%s) on the training split", KIND_NAMES[kind],
                class_name, vocab_size, lowercase)
    started = time.perf_counter()
    tokenizer = train_tokenizer(_text_batches(train_dataset, text_column), model_type, kind, vocab_size, lowercase,
                                model_max_length)
    seconds = time.perf_counter() - started
    # Save under a temporary name, then rename: a reader never sees half a tokenizer.
    tmp = directory.with_name(f"{directory.name}.tmp{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, directory)
    except OSError:  # another process finished first; its tokenizer is the same
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Trained tokenizer: %d tokens in %.1f s, saved to %s", len(tokenizer), seconds, directory)
    return AutoTokenizer.from_pretrained(directory)


def held_out_texts(raw_datasets, text_column: str, n: int = 1000) -> list[str]:
    """Up to `n` non-blank texts the tokenizer was not trained on (the validation split), for its unknown rate."""
    split = raw_datasets.get("validation") if hasattr(raw_datasets, "get") else None
    if split is None or isinstance(split, IterableDataset):
        return []
    texts = split[:n][text_column] if len(split) else []
    return [t for t in texts if t and not t.isspace()]


def sample_stream(stream, text_column: str, max_chars: int = STREAM_SAMPLE_CHARS):
    """The first `max_chars` characters of a stream's texts, as a dataset to train a tokenizer on.

    Its fingerprint depends on the texts only, so every process and rerun finds the same
    cached tokenizer.
    """
    from datasets import Dataset

    from utils.data.streaming import iter_texts

    texts, chars, digest = [], 0, hashlib.sha256()
    for text in iter_texts(stream, text_column):
        texts.append(text)
        digest.update(text.encode() + b"\x00")
        chars += len(text)
        if chars >= max_chars:
            break
    logger.info("Streaming: training the tokenizer on the first %d texts (%.0f MB)", len(texts), chars / 1e6)
    sample = Dataset.from_dict({text_column: texts})
    sample._fingerprint = digest.hexdigest()[:16]
    return sample


def load_pretrained_tokenizer(name_or_path: str, model_args, flag: str):
    """Load a tokenizer from a directory or the hub; `flag` names the argument it came from."""
    try:
        return AutoTokenizer.from_pretrained(
            name_or_path,
            cache_dir=model_args.cache_dir,
            use_fast=model_args.use_fast_tokenizer,
            revision=model_args.model_revision,
            token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
        )
    except OSError as e:
        raise UsageError(f"--{flag} {name_or_path}: cannot load a tokenizer ({one_line(e)})") from e


def check_mask_token(tokenizer, source: str) -> None:
    """MLM needs a mask token; say so before any work is done."""
    if tokenizer.mask_token is None:
        raise UsageError(
            f"the tokenizer from {source} has no mask token, which masked language modeling needs; "
            "use a tokenizer made for MLM (BERT, RoBERTa, ...) or omit --tokenizer_name to train one"
        )


def load_or_train_tokenizer(model_args, data_args, raw_datasets, checkpoint, training_args):
    """The run's tokenizer and a phrase saying where it came from.

    In order: --tokenizer_name, the pretrained model's, the one saved with prepared data
    (--tokenized_dataset_path), the checkpoint being resumed, or one trained on the training
    text, of the kind the model family uses or --tokenizer_type says (by rank 0 only, then
    sent to the other processes: two trainings need not give the same vocabulary).
    """
    from utils.data.corpus import run_cache_dir
    from utils.data.pipeline import text_column_of

    if model_args.tokenizer_name or model_args.model_name_or_path:
        flag = "tokenizer_name" if model_args.tokenizer_name else "model_name_or_path"
        name = getattr(model_args, flag)
        tokenizer, source = load_pretrained_tokenizer(name, model_args, flag), f"`{name}` (--{flag})"
    elif getattr(data_args, "tokenized_dataset_path", None):
        from utils.data.prepared import load_prepared_tokenizer

        tokenizer = load_prepared_tokenizer(data_args.tokenized_dataset_path)
        source = f"the prepared data's, `{data_args.tokenized_dataset_path}`"
    elif checkpoint and os.path.exists(os.path.join(checkpoint, "tokenizer.json")):
        tokenizer = load_pretrained_tokenizer(checkpoint, model_args, "resume_from_checkpoint")
        source = f"the checkpoint resumed from, `{checkpoint}`"
    else:
        split = raw_datasets["train"] if "train" in raw_datasets else raw_datasets["validation"]
        text_column = text_column_of(split, data_args.text_column_name)
        if isinstance(split, IterableDataset):
            split = sample_stream(split, text_column)
        cache_root = run_cache_dir(model_args.cache_dir)
        model_type = family_model_type(model_args)
        kind, lowercase, class_name = choose(model_type, model_args.tokenizer_type, model_args.tokenizer_lowercase)
        tokenizer = share_tokenizer(training_args, lambda: train_or_load_cached_tokenizer(
            split, text_column, model_args.tokenizer_vocab_size, lowercase,
            model_max_length=data_args.max_seq_length or 512, cache_root=cache_root, model_type=model_type,
            kind=kind,
        ), cache_root)
        held_out = held_out_texts(raw_datasets, text_column)
        unknown = f", {unknown_rate(tokenizer, held_out):.3%} unknown tokens on held-out text" if held_out else ""
        source = (f"{KIND_NAMES[kind]}, {len(tokenizer)} tokens, {'uncased' if lowercase else 'cased'}, trained on "
                  f"the training text ({type(tokenizer).__name__}, mask {tokenizer.mask_token}{unknown})")
        logger.info("Tokenizer: %s", source)
    check_mask_token(tokenizer, source)
    report_own_padding(tokenizer, source)
    return tokenizer, source


def family_model_type(model_args) -> str | None:
    """The model type whose family's tokenizer to train: --model_type, else --config_name's."""
    if model_args.model_type or not model_args.config_name:
        return model_args.model_type
    from utils.model.modeling import load_config

    return load_config(model_args).model_type


def report_own_padding(tokenizer, source: str) -> None:
    """Say, in one line, that padding or truncation saved in the tokenizer is ignored for the training data."""
    from utils.data.encoding import own_padding

    what = own_padding(tokenizer)
    if what:
        logger.warning("The tokenizer from %s %s on its own (its tokenizer.json says so, as sentence-transformers "
                       "saves it); the training data is tokenized without that, as tokenizer(text) gives it. The "
                       "tokenizer saved with the model is unchanged.", source, what)


def share_tokenizer(training_args, make_tokenizer, cache_root: Path):
    """A tokenizer made by `make_tokenizer()` on rank 0, the same one on every process.

    Every process, rank 0 included, loads it from a directory named after its content:
    `datasets` hashes the tokenizer (its path included) into the tokenization cache key,
    so the same path everywhere lets the other processes, and reruns, hit that cache.
    """
    import tempfile

    from utils.train.distributed import compute_once

    def files_of_new_tokenizer():
        with tempfile.TemporaryDirectory() as tmp:
            make_tokenizer().save_pretrained(tmp)
            return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}

    files = compute_once(training_args, files_of_new_tokenizer, desc="training the tokenizer")
    digest = hashlib.sha256(b"".join(name.encode() + content for name, content in files.items())).hexdigest()
    directory = cache_root / "tokenizers" / f"shared-{digest[:16]}"
    if not (directory / "tokenizer.json").exists():
        tmp = directory.with_name(f"{directory.name}.tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            (tmp / name).write_bytes(content)
        try:
            os.replace(tmp, directory)
        except OSError:  # another process on this machine wrote the same files first
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(directory)
