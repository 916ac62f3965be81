"""Datasets: load raw text (hub, local files or a builtin corpus), tokenize, group into blocks."""

from __future__ import annotations

import glob
import logging
import os
import time
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, Features, LargeList, Value, load_dataset
from datasets.exceptions import DatasetGenerationError
from tqdm.auto import tqdm

from utils.data.encoding import check_no_padding, encode_to_arrays, encode_with_word_starts, exact_copy, word_starts_of
from utils.data.masking import WORD_STARTS
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
    if os.path.isdir(os.path.expanduser(path)):
        raise UsageError(f"--{flag} {path} is a directory; name its files, for example --{flag} "
                         f"\"{os.path.join(path, '*.txt')}\" (quoted: the script expands the pattern)")
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
                options = {}
                if builder in ("text", "csv", "json") and getattr(data_args, "encoding_errors", "strict") != "strict":
                    options["encoding_errors"] = data_args.encoding_errors
                try:
                    raw[split] = load_dataset(builder, data_files=files, split="train",
                                              streaming=data_args.streaming, **options, **common)
                except DatasetGenerationError as e:
                    raise UsageError(describe_load_error(e, files, flag)) from e
                if not data_args.streaming:  # the text column exists (before any split hides the problem)
                    text_column_of(raw[split], data_args.text_column_name)
    # A stream has no length to take a percentage of: streaming holds out blocks instead (utils.data.streaming).
    if "validation" not in raw and "train" in raw and data_args.validation_split_percentage > 0 \
            and not data_args.streaming:
        raw["validation"], raw["train"] = split_off_validation(raw["train"], data_args.validation_split_percentage)
    return raw


def describe_load_error(error: Exception, files: list[str], flag: str) -> str:
    """One line for a file `datasets` could not read: where undecodable bytes are, or the parser's complaint."""
    cause = error.__cause__ or error.__context__
    if isinstance(cause, UnicodeDecodeError):
        for path in files:
            where = find_undecodable(path)
            if where:
                line, offset, context = where
                return (f"--{flag} {path}: bytes that are not UTF-8 at line {line} (byte {offset}: {context}); "
                        "convert the file to UTF-8, or pass --encoding_errors replace (bad bytes become U+FFFD) "
                        "or --encoding_errors ignore (they are dropped)")
        return f"--{flag}: bytes that are not UTF-8 ({one_line(cause)}); pass --encoding_errors replace or ignore"
    return f"--{flag} {' '.join(files)}: cannot be read: {one_line(cause or error)}"


def find_undecodable(path: str) -> tuple[int, int, str] | None:
    """(line number, byte offset, the bytes around it) of the first invalid UTF-8 in `path`, or None.

    Offsets are in the decompressed text; None for a compression this cannot open (.zst).
    """
    import bz2
    import codecs
    import gzip
    import lzma

    openers = {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}
    suffix = path.rsplit(".", 1)[-1].lower()
    if suffix in COMPRESSIONS and suffix not in openers:
        return None
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with openers.get(suffix, open)(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                # e.object is the bytes held back from the previous chunk followed by this one.
                pending = len(e.object) - len(chunk)
                line += e.object[pending:max(pending, e.start)].count(b"\n")
                return line, offset - pending + e.start, repr(e.object[max(0, e.start - 20): e.start + 4])
            line += chunk.count(b"\n")
            offset += len(chunk)
    return None


def load_text(data_args, model_args, training_args) -> DatasetDict:
    """The raw text splits, building the builtin corpus first when one is asked for (main process first)."""
    from utils.data.corpus import build_corpus
    from utils.train import distributed

    train_files = None
    if data_args.builtin_corpus:
        with distributed.main_process_first(training_args, "building the corpus"):
            train_files = [str(build_corpus(data_args.builtin_corpus, model_args.cache_dir))]
    return load_raw_datasets(data_args, model_args, train_files)


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


def text_column_of(dataset, requested: str | None) -> str:
    """The text column of a dataset or stream (a stream of json may not know its columns before reading)."""
    column_names, features = dataset.column_names, dataset.features
    if column_names is None:  # an unresolved stream: look at its first row
        first = next(iter(dataset), {})
        column_names = list(first)
        features = {k: Value("string") for k, v in first.items() if isinstance(v, str)}
    return find_text_column(column_names, features or {}, requested)


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


def token_dtype(vocab_size: int) -> str:
    """The smallest unsigned integer type that holds every token id (uint16 up to 65536 tokens)."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def tokenize_batch(batch: pa.Table, tokenizer, text_column: str, dtype: str,
                   with_word_starts: bool = False) -> pa.Table:
    """`datasets.map` function (arrow format): one row of token ids per non-blank text, nothing else.

    `tokenizer` is exact (`utils.data.encoding.exact_copy`). Attention masks and token type ids are
    implied by full blocks, so they are not stored; ids take the smallest integer type (a
    quarter of the int64 the reference stores). With `with_word_starts` (whole-word masking,
    fast tokenizers), a `word_starts` row too: one byte per token.
    """
    texts = _non_blank(batch.column(text_column).to_pylist())
    if not with_word_starts:
        ids, offsets = encode_to_arrays(texts, tokenizer, dtype)
        return pa.table({"input_ids": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(ids))})
    ids, offsets, starts = encode_with_word_starts(texts, tokenizer, dtype)
    offsets = pa.array(offsets)
    return pa.table({"input_ids": pa.LargeListArray.from_arrays(offsets, pa.array(ids)),
                     WORD_STARTS: pa.LargeListArray.from_arrays(offsets, pa.array(starts))})


def tokenize_lines(
    examples: dict, tokenizer, text_column: str, max_seq_length: int, pad: bool, with_word_starts: bool = False
) -> dict:
    """Tokenize each non-blank line as one example, truncated to `max_seq_length` (line_by_line mode)."""
    texts = _non_blank(examples[text_column])
    encoded = tokenizer(
        texts,
        truncation=True,
        max_length=max_seq_length,
        padding="max_length" if pad else False,
        # Padded rows need their mask stored; unpadded rows get one from the collator.
        return_attention_mask=pad,
        return_token_type_ids=False,
    )
    if not pad:
        check_no_padding(np.fromiter((i for ids in encoded["input_ids"] for i in ids), dtype=np.int64), texts,
                         tokenizer)
    rows = dict(encoded)
    if with_word_starts:
        rows[WORD_STARTS] = [word_starts_of(encoded.word_ids(i)) for i in range(len(texts))]
    return rows


def count_characters(dataset: Dataset, text_column: str) -> int:
    """Characters in the text column (what the token counts are reported against)."""
    total = 0
    for batch in dataset.select_columns([text_column]).with_format("arrow").iter(batch_size=100_000):
        total += pc.sum(pc.utf8_length(batch.column(text_column))).as_py() or 0
    return total


class BlockPacker:
    """Cut a stream of token sequences into blocks of `block_size`, carrying the remainder along.

    The one packer of the project: the prepared datasets (Arrow arrays, `pack_dataset`) and
    the streamed ones (numpy arrays, `utils.data.streaming`) both cut their blocks here. Only the
    tail of the whole stream (less than one block) is lost, unlike grouping each
    `datasets.map` batch on its own (the reference's `group_texts`), which drops a partial
    block per batch of texts. Columns of any element type (token ids, word starts) are cut
    at the same places.
    """

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.carry: dict[str, pa.Array | np.ndarray] = {}

    def add(self, columns: dict[str, pa.Array | np.ndarray]) -> dict[str, pa.Array | np.ndarray]:
        """Append flat token arrays (one per column, equal lengths); return the full blocks now available.

        Arrow arrays give FixedSizeListArrays of blocks; numpy arrays give 2-D arrays (views).
        """
        blocks = {}
        for name, flat in columns.items():
            arrow = isinstance(flat, pa.Array)
            carry = self.carry.get(name)
            if carry is not None and len(carry):
                flat = pa.concat_arrays([carry, flat]) if arrow else np.concatenate([carry, flat])
            n_tokens = len(flat) // self.block_size * self.block_size
            # The carry is a copy, so that it does not pin the whole batch's buffers in memory.
            if arrow:
                blocks[name] = pa.FixedSizeListArray.from_arrays(flat.slice(0, n_tokens), self.block_size)
                self.carry[name] = pa.concat_arrays([flat.slice(n_tokens)])
            else:
                blocks[name] = flat[:n_tokens].reshape(-1, self.block_size, *flat.shape[1:])
                self.carry[name] = flat[n_tokens:].copy()
        return blocks

    @property
    def tokens_left(self) -> int:
        """Tokens in the partial block at the end: the only ones not trained on."""
        return max((len(a) for a in self.carry.values()), default=0)


def pack_dataset(tokenized: Dataset, block_size: int, overwrite: bool = False, desc: str = "") -> tuple[Dataset, int]:
    """Group a tokenized dataset (list columns) into blocks of `block_size` in one pass over its Arrow data.

    Concatenation is done by Arrow on whole record batches, not with Python lists. The
    result is cached next to the tokenized data, keyed on its fingerprint and the block
    size, and written under a temporary name first, so a reader never sees half a file.
    Returns the blocks and the number of tokens lost (the last partial block).
    """
    table = tokenized.data.table
    names = table.column_names
    cache_files = tokenized.cache_files
    path = None
    if cache_files:
        directory = os.path.dirname(cache_files[0]["filename"])
        path = os.path.join(directory, f"blocks-{tokenized._fingerprint}-{block_size}.arrow")
        if os.path.exists(path) and os.path.exists(path + ".lost") and not overwrite:
            logger.info("Reusing the grouped blocks in %s", path)
            with open(path + ".lost") as f:
                return Dataset.from_file(path), int(f.read())
    packer = BlockPacker(block_size)
    schema = None
    batches = []
    sink = writer = None
    tmp = f"{path}.tmp{os.getpid()}" if path else None
    with tqdm(total=sum(len(c.flatten()) for c in table.column(names[0]).chunks) if table.num_rows else 0,
              unit="tok", unit_scale=True, desc=desc or f"Grouping into blocks of {block_size}",
              disable=not logger.isEnabledFor(logging.INFO)) as bar:
        for record_batch in table.to_batches(max_chunksize=10_000):
            flat = {name: record_batch.column(name).flatten() for name in names}
            bar.update(len(flat[names[0]]))
            blocks = packer.add(flat)
            out = pa.record_batch(list(blocks.values()), names=list(blocks))
            if schema is None:
                schema = out.schema
                if tmp:
                    sink = pa.OSFile(tmp, "wb")
                    writer = pa.ipc.new_stream(sink, schema)
            if writer:
                writer.write_batch(out)
            else:
                batches.append(out)
    if writer:
        writer.close()
        sink.close()
        os.replace(tmp, path)
        with open(path + ".lost", "w") as f:
            f.write(str(packer.tokens_left))
        return Dataset.from_file(path), packer.tokens_left
    if schema is None:
        return Dataset.from_dict({name: [] for name in names}), 0
    return Dataset(pa.Table.from_batches(batches)), packer.tokens_left


def preprocess_datasets(raw: DatasetDict, tokenizer, data_args, max_seq_length: int,
                        stats: dict | None = None) -> DatasetDict:
    """Tokenize `raw` and turn it into training examples (fixed blocks, or one per line).

    Every text gets exactly the ids `tokenizer(text)` gives, whatever padding or truncation
    the tokenizer's saved state holds (utils.data.encoding); line_by_line truncates at
    `max_seq_length`. Results go to the `datasets` cache: run it on the main process first,
    and the others read the cache instead of tokenizing again. Blocks keep tokens across
    batches of texts: at most one partial block per split is lost. Counts (blocks, tokens,
    characters, tokens lost) are logged and recorded in `stats[split]`.
    """
    text_column = text_column_of(raw["train" if "train" in raw else "validation"], data_args.text_column_name)
    word_starts = data_args.whole_word_mask
    map_kwargs = {
        "batched": True,
        "num_proc": data_args.preprocessing_num_workers,
        "load_from_cache_file": not data_args.overwrite_cache,
    }
    dtype = token_dtype(len(tokenizer))
    processed = DatasetDict()
    for split, dataset in raw.items():
        started = time.perf_counter()
        # A fresh copy per split: the wrapper calls below change its backend's state, never the caller's.
        exact = exact_copy(tokenizer)
        if data_args.line_by_line:
            processed[split] = dataset.map(
                tokenize_lines,
                fn_kwargs={"tokenizer": exact, "text_column": text_column, "max_seq_length": max_seq_length,
                           "pad": data_args.pad_to_max_length, "with_word_starts": word_starts},
                remove_columns=dataset.column_names,
                desc=f"Tokenizing {split} lines",
                **map_kwargs,
            )
            lengths = pc.list_value_length(processed[split].data.table.column("input_ids"))
            counts = {"rows": len(processed[split]), "tokens": pc.sum(lengths).as_py() or 0,
                      "rows_at_max_length": pc.sum(pc.equal(lengths, max_seq_length)).as_py() or 0}
            description = (f"{counts['rows']:,} lines of up to {max_seq_length} tokens "
                           f"({counts['rows_at_max_length']:,} of them cut or filled to that length)")
        else:
            # Whole-word masking also stores where each word starts (one byte per token).
            features = {"input_ids": LargeList(Value(dtype)),
                        **({WORD_STARTS: LargeList(Value("uint8"))} if word_starts else {})}
            tokenized = dataset.select_columns([text_column]).with_format("arrow").map(
                tokenize_batch,
                fn_kwargs={"tokenizer": exact, "text_column": text_column, "dtype": dtype,
                           "with_word_starts": word_starts},
                remove_columns=[text_column],
                features=Features(features),
                desc=f"Tokenizing {split}",
                **map_kwargs,
            ).with_format(None)
            if len(tokenized) == 0:
                raise UsageError(f"the {split} text is blank: every row of {_describe_source(data_args, split)} is "
                                 "empty or whitespace; give a file with text")
            processed[split], lost = pack_dataset(tokenized, max_seq_length, overwrite=data_args.overwrite_cache,
                                                  desc=f"Grouping {split} into blocks of {max_seq_length}")
            n_blocks = len(processed[split])
            counts = {"blocks": n_blocks, "tokens": n_blocks * max_seq_length + lost,
                      "tokens_in_blocks": n_blocks * max_seq_length, "tokens_lost": lost}
            description = (f"{n_blocks:,} blocks of {max_seq_length} tokens, {lost:,} tokens left over in the last "
                           "partial block")
        counts["characters"] = count_characters(dataset, text_column)
        if stats is not None:
            stats[split] = counts
        # Tokens beside characters: a tokenizer that padded or cut every text would show here.
        logger.info("%s: %s tokens from %s characters of text (%.2f characters per token): %s; %.1f s",
                    split, f"{counts['tokens']:,}", f"{counts['characters']:,}",
                    counts["characters"] / max(counts["tokens"], 1), description, time.perf_counter() - started)
        if len(processed[split]) == 0:
            raise UsageError(
                f"the {split} split has fewer tokens than one block of {max_seq_length} "
                f"(--max_seq_length); give more text or a smaller --max_seq_length"
            )
    return processed


def _describe_source(data_args, split: str) -> str:
    files = data_args.validation_file if split == "validation" and data_args.validation_file else data_args.train_file
    if files:
        return f"--{'validation_file' if files is data_args.validation_file else 'train_file'} {' '.join(files)}"
    return "the dataset"


def truncate(dataset: Dataset, max_samples: int | None) -> Dataset:
    """The first `max_samples` examples of `dataset` (all of them when None)."""
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    return dataset.select(range(max_samples))


def report_cache_reuse(datasets, started: float, training_args) -> None:
    """On a non-main process, say whether the tokenized data came from the main process's cache.

    A cache file written after this process started its maps means it tokenized again
    (for instance because the cache is not on a filesystem the processes share).
    """
    from utils.train.distributed import process_logger, processes

    who = processes(training_args)
    if who.world <= 1 or who.local_rank == 0:
        return
    files = [f["filename"] for split in datasets.values() for f in split.cache_files]
    if not files:
        return
    rewritten = [f for f in files if os.path.getmtime(f) >= started]
    if rewritten:
        logger.warning("Process %d tokenized the data again instead of reading the main process's cache (%d of "
                       "%d files rewritten)", who.rank, len(rewritten), len(files))
    else:
        process_logger.info("Process %d read the tokenized data from the main process's cache (%d files)",
                            who.rank, len(files))
