"""Streaming: tokenize and pack text into blocks on the fly, for corpora too large to prepare ahead.

Nothing here calls `len()`: a stream has no length. Training runs for `--max_steps`;
evaluation uses a fixed number of held-out blocks, kept in memory. With several
processes, each one tokenizes only its own share of the texts (its own shards of the
stream where their number allows, else every `world_size`-th text), so the ranks see
different data and no rank tokenizes for the others.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from functools import partial

import numpy as np
from datasets import Dataset, Features, IterableDataset, List, Value

from utils.data.encoding import encode_to_arrays, exact_copy, is_exact
from utils.data.masking import STREAM_POSITION
from utils.data.pipeline import BlockPacker, _non_blank, text_column_of, token_dtype
from utils.errors import UsageError

logger = logging.getLogger(__name__)

# Held-out blocks when the stream has no validation split and --max_eval_samples is not given.
DEFAULT_EVAL_BLOCKS = 512
TEXTS_PER_BATCH = 1000


def iter_texts(dataset: Iterable[dict], text_column: str) -> Iterator[str]:
    """The non-blank texts of a stream of rows."""
    for row in dataset:
        text = row.get(text_column)
        if text and not text.isspace():
            yield text


def _batches(iterable: Iterable, size: int) -> Iterator[list]:
    iterator = iter(iterable)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def iter_blocks(texts: Iterable[str], tokenizer, block_size: int, dtype: str | None = None,
                stats: dict | None = None, texts_per_batch: int = TEXTS_PER_BATCH) -> Iterator[np.ndarray]:
    """Tokenize `texts` in batches and yield blocks of `block_size` ids, carrying the remainder across batches.

    Each text gives exactly the ids `tokenizer(text)` gives (no padding or truncation saved
    in the tokenizer). `stats`, if given, holds the texts and characters consumed so far (up
    to the batch of the block just yielded) and the tokens left in the partial block (at the
    end, the only ones lost).
    """
    dtype = dtype or token_dtype(len(tokenizer))
    if not is_exact(tokenizer):
        tokenizer = exact_copy(tokenizer)
    packer = BlockPacker(block_size)
    for batch in _batches(texts, texts_per_batch):
        texts_of_batch = _non_blank(batch)
        ids, _ = encode_to_arrays(texts_of_batch, tokenizer, dtype)
        blocks = packer.add({"input_ids": ids})["input_ids"]
        if stats is not None:
            stats["texts"] = stats.get("texts", 0) + len(batch)
            stats["characters"] = stats.get("characters", 0) + sum(map(len, texts_of_batch))
            stats["tokens_left"] = packer.tokens_left
        yield from blocks


def iter_positioned_blocks(texts: Iterable[str], tokenizer, block_size: int, dtype: str,
                           drop_tokens: int = 0) -> Iterator[tuple[np.ndarray, tuple[int, int]]]:
    """As `iter_blocks`, each block with where the next one starts: (text t, token o of its ids), t counted from
    the first of `texts`. `drop_tokens`: start o tokens into the first text (a resume at such a position).

    The blocks from a position are those the uninterrupted stream gives from there: a block
    boundary is a point in the token stream, and every text gives the same ids however the
    texts are batched.
    """
    if not is_exact(tokenizer):
        tokenizer = exact_copy(tokenizer)
    packer = BlockPacker(block_size)
    # (text index, first token's offset in the stream) of the texts from the first one the carry holds.
    starts: list[tuple[int, int]] = []
    total = 0  # tokens in the stream so far, the dropped ones included
    flat_start = drop_tokens  # stream offset of the carry's first token
    index = 0
    for batch in _batches(texts, TEXTS_PER_BATCH):
        ids, offsets = encode_to_arrays(_non_blank(batch), tokenizer, dtype)
        starts += [(index + i, total + int(offset)) for i, offset in enumerate(offsets)]
        index, total = index + len(offsets), total + len(ids)
        if total <= drop_tokens:
            raise ValueError(f"cannot resume {drop_tokens} tokens into a text of {total}")
        fresh = ids[max(drop_tokens - (total - len(ids)), 0):]
        blocks = packer.add({"input_ids": fresh})["input_ids"]
        offsets_in_stream = np.array([start for _, start in starts] + [total])
        for j, block in enumerate(blocks):
            end = flat_start + (j + 1) * block_size
            k = int(np.searchsorted(offsets_in_stream, end, side="right")) - 1
            yield block, (index, 0) if k == len(starts) else (starts[k][0], end - starts[k][1])
        flat_start += len(blocks) * block_size
        starts = [start for k, start in enumerate(starts) if offsets_in_stream[k + 1] > flat_start]
        drop_tokens = 0 if total > drop_tokens else drop_tokens


def take_blocks(texts: Iterable[str], tokenizer, block_size: int, n_blocks: int) -> tuple[np.ndarray, int]:
    """The first `n_blocks` blocks of `texts`, and how many texts they used (whole texts, by line)."""
    dtype = token_dtype(len(tokenizer))
    stats: dict = {}
    # One text per batch, so that no text beyond the last block's is consumed.
    blocks = list(itertools.islice(iter_blocks(texts, tokenizer, block_size, dtype, stats, texts_per_batch=1),
                                   n_blocks))
    return (np.stack(blocks) if blocks else np.empty((0, block_size), dtype=dtype)), stats.get("texts", 0)


def _by_shards(raw, n_parts: int) -> bool:
    """Whether each of `n_parts` processes reads whole shards of its own (see `part_texts`)."""
    return n_parts > 1 and getattr(raw, "n_shards", 1) % n_parts == 0 and hasattr(raw, "shard")


def part_texts(raw, text_column: str, part: int, n_parts: int, skip_texts: int = 0) -> Iterator[str]:
    """The texts of one process's share of the training stream.

    Where the stream has a multiple of `n_parts` shards (files, hub parquet shards), each
    process reads whole shards of its own, contiguous ones (part 0 begins with the stream's
    start, where `skip_texts` texts were held out): it downloads and parses only those.
    Otherwise every process reads the whole stream and tokenizes every `n_parts`-th text.
    """
    if _by_shards(raw, n_parts):
        own = raw.shard(num_shards=n_parts, index=part, contiguous=True)
        return itertools.islice(iter_texts(own, text_column), skip_texts if part == 0 else 0, None)
    return itertools.islice(iter_texts(raw, text_column), skip_texts + part, None, n_parts)


def describe_share(raw, part: int, n_parts: int) -> str:
    """Which texts `part_texts` gives a process, for the log."""
    if _by_shards(raw, n_parts):
        per = raw.n_shards // n_parts
        return f"shards {part * per}-{part * per + per - 1} of {raw.n_shards} (reads only those)"
    return f"texts {part}, {part + n_parts}, {part + 2 * n_parts}, ... of the whole stream"


def _part_generator(parts: list[int], *, raw, text_column: str, tokenizer, block_size: int, n_parts: int,
                    skip_texts: int, max_blocks: int | None, passes: int | None = None,
                    start: dict | None = None):
    """Rows of blocks for the given parts (see `part_texts`), read again from the start each time a part ends.

    A stream is trained on for --max_steps, and its shares are not equally long: a process
    whose share ended would end its epoch on its own, mid-accumulation, and its gradient
    all-reduces would pair with other steps of the other processes. So a share never ends
    (`passes`: stop after that many, for tests); one that holds no block is an error.

    Each row carries `stream_position`: [pass, blocks of the pass so far, text, token] where
    the next block starts. `start` ({part: such a position}, from a checkpoint) resumes a
    part there: the texts before it are skipped untokenized.
    """
    dtype = token_dtype(len(tokenizer))
    for part in parts:
        done, blocks, first_text, drop = (start or {}).get(part, (0, 0, 0, 0))
        while passes is None or done < passes:
            texts = itertools.islice(part_texts(raw, text_column, part, n_parts, skip_texts), first_text, None)
            left = None if max_blocks is None else max(max_blocks - blocks, 0)
            count = blocks
            for block, (text, token) in itertools.islice(
                    iter_positioned_blocks(texts, tokenizer, block_size, dtype, drop), left):
                count += 1
                yield {"input_ids": block.tolist(), STREAM_POSITION: [done, count, first_text + text, token]}
            if count == 0:
                raise UsageError(f"the training stream's share {part} of {n_parts} holds less than one block of "
                                 f"{block_size} tokens; give more text, fewer processes or a smaller --max_seq_length")
            done, blocks, first_text, drop = done + 1, 0, 0, 0
            logger.info("Streaming: share %d of %d of the training text ended after %d blocks; reading it again "
                        "(pass %d)", part, n_parts, count, done + 1)


def save_position(checkpoint: str, rank: int, world: int, position: list[int]) -> None:
    """Write where this process's share of the stream goes on (see `_part_generator`) into a checkpoint."""
    import json
    import os

    os.makedirs(checkpoint, exist_ok=True)
    with open(os.path.join(checkpoint, f"stream_position_{rank}.json"), "w") as f:
        json.dump({"world_size": world, "position": [int(v) for v in position]}, f)


def load_position(checkpoint: str | None, rank: int, world: int) -> list[int] | None:
    """The position `save_position` wrote for this process; None without one, or for another number of processes."""
    import json
    import os

    path = os.path.join(checkpoint, f"stream_position_{rank}.json") if checkpoint else None
    if path is None or not os.path.isfile(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    return saved["position"] if saved.get("world_size") == world else None


def streaming_datasets(raw: dict, tokenizer, data_args, max_seq_length: int, n_parts: int,
                       do_eval: bool, start: dict | None = None) -> tuple[IterableDataset | None, Dataset | None]:
    """The training stream of blocks (split into `n_parts` shards, one per process) and the held-out blocks.

    Evaluation blocks come from the start of the validation stream if there is one, else
    from the start of the training stream, whose training part then begins after the texts
    they used: no text is both trained and evaluated on.
    """
    text_column = text_column_of(raw["train" if "train" in raw else "validation"], data_args.text_column_name)
    n_eval = data_args.max_eval_samples or DEFAULT_EVAL_BLOCKS
    tokenizer = exact_copy(tokenizer)  # once here, not in every part's generator
    eval_dataset, skip = None, 0
    dtype = token_dtype(len(tokenizer))
    if do_eval:
        source = raw["validation"] if "validation" in raw else raw["train"]
        blocks, used = take_blocks(iter_texts(source, text_column), tokenizer, max_seq_length, n_eval)
        if len(blocks) == 0:
            raise UsageError(f"the evaluation stream has fewer tokens than one block of {max_seq_length} "
                             "(--max_seq_length); give more text or a smaller --max_seq_length")
        if len(blocks) < n_eval:
            logger.warning("The evaluation stream gave %d blocks, not %d", len(blocks), n_eval)
        if "validation" not in raw:
            skip = used
            logger.info("Streaming: held out the first %d texts of the training stream for %d evaluation blocks",
                        used, len(blocks))
        eval_dataset = Dataset.from_dict({"input_ids": blocks}, features=Features({"input_ids": List(Value(dtype))}))
    train_dataset = None
    if "train" in raw:
        generator = partial(_part_generator, raw=raw["train"], text_column=text_column, tokenizer=tokenizer,
                            block_size=max_seq_length, n_parts=n_parts, skip_texts=skip,
                            # --max_train_samples, shared between the parts
                            max_blocks=None if data_args.max_train_samples is None
                            else -(-data_args.max_train_samples // n_parts),
                            start=start)
        train_dataset = IterableDataset.from_generator(
            generator, gen_kwargs={"parts": list(range(n_parts))},
            features=Features({"input_ids": List(Value(dtype)), STREAM_POSITION: List(Value("int64"))}),
        )
    return train_dataset, eval_dataset
