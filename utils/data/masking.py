"""The MLM collator: batches examples and masks tokens (80% [MASK] / 10% random / 10% kept by default).

Masks are drawn by `MLMCollator.mask_rows`, token by token or whole word by whole word
(`--whole_word_mask`): a word is what the tokenizer's pre-tokenizer made one (its
`word_ids`), so WordPiece `##` pieces, byte-level BPE `Ġ` words and SentencePiece `▁`
words are all handled the same way. Blocks carry a `word_starts` column (1 where a token
begins a word) for that; a word cut by a block boundary is two words, one in each block,
each masked whole on its own.

`max_predictions` caps the selected tokens of each block (BERT's `max_predictions_per_seq`),
so that a head that predicts a fixed number of slots per block (the sparse head on XLA,
where shapes must not change between steps) sees every selected token: a block with more
keeps a uniformly random subset of them, and the tokens dropped are counted.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from transformers import DataCollatorForLanguageModeling
from transformers.data.data_collator import pad_without_fast_tokenizer_warning

logger = logging.getLogger(__name__)

WORD_STARTS = "word_starts"
STREAM_POSITION = "stream_position"  # as utils.data.streaming names it (this module imports no data code)
_MASK64 = (1 << 64) - 1
EVAL_MLM_PROBABILITY = 0.15  # the evaluation set's default selection rate (BERT's)
_EVAL = 1 << 40  # the "step" of the evaluation set's masks: never a training step


def row_seed(seed: int, step: int, row: int) -> int:
    """The generator seed of one row's masks: a 63-bit hash of (seed, step, row) (splitmix64 rounds).

    Nearby triples give unrelated seeds, so rows, steps and runs draw independent streams.
    """
    state = 0
    for part in (seed, step, row):
        state = (state ^ (part & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        state = (state ^ (state >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & _MASK64
        state ^= state >> 31
    return state >> 1


@dataclass
class MLMCollator(DataCollatorForLanguageModeling):
    """`DataCollatorForLanguageModeling` with reproducible, optionally whole-word masks.

    With `seed` set, the masks of a training batch are a function of the seed, the
    optimizer step and the row's position in the global batch only: each row's random
    numbers come from a generator seeded by (seed, step, global row), so every process
    draws for its own rows only, whatever the number of processes and accumulation steps
    (64 GPUs x 8 accumulation steps cost each process what one does). The collator then
    only pads; `mask_batch` draws the masks on the main process, where the optimizer step
    is known (`utils.train.trainer.MLMTrainer` calls it for each step's batches). A run on 1 or
    N processes, with 0 or N dataloader workers, with or without gradient accumulation, or
    resumed from a checkpoint therefore masks the same tokens of the same examples. Without
    a seed, each batch is masked when collated, from torch's random generator.

    `whole_words`: rows carry `word_starts`, and every token of a selected word gets the
    word's decision (masked, replaced by random tokens, or kept). Rows that already carry
    `labels` (the evaluation set, masked once) are only padded.
    """

    rank: int = 0
    world_size: int = 1
    whole_words: bool = False
    max_predictions: int | None = None
    eval_probability: float | None = None  # the evaluation set's selection rate (None: mlm_probability)
    # (tokens dropped by the cap, tokens selected before it) per kind of masking, as tensors
    # on the device that did the masking: summed without a sync, read once for the log.
    capped: dict = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        self.special_ids = torch.tensor(sorted(set(self.tokenizer.all_special_ids)), dtype=torch.long)
        self.mask_token_id = self.tokenizer.convert_tokens_to_ids(self.tokenizer.mask_token)

    @property
    def masks_by_step(self) -> bool:
        """Whether batches leave the collator unmasked, for `mask_batch` to mask by optimizer step."""
        return self.seed is not None

    def torch_call(self, examples):
        if isinstance(examples[0], dict) and "labels" in examples[0]:
            return self._pad_premasked(examples)
        batch = self._pad(examples)
        if self.masks_by_step:
            # Masked later by `mask_batch`: a dataloader worker knows neither the optimizer step
            # nor where its batch falls in it.
            return batch
        return self._mask(batch, torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)))))

    def mask_batch(self, batch: dict, step: int, micro: int = 0) -> dict:
        """Mask a padded batch as micro-batch `micro` of optimizer step `step` on this process (in place).

        Row i of the batch is row (micro x world + rank) x rows + i of the step's global
        batch, and its masks come from that number, the step and the seed only.
        """
        if "labels" in batch:  # masked already (the evaluation set)
            return batch
        rows = batch["input_ids"].shape[0]
        first_row = (micro * self.world_size + self.rank) * rows
        return self._mask(batch, [row_seed(self.seed, step, first_row + i) for i in range(rows)])

    def _mask(self, batch: dict, seeds: list[int] | torch.Generator) -> dict:
        starts = batch.pop(WORD_STARTS, None)
        if self.whole_words and starts is None:
            raise ValueError("whole-word masking needs rows with word_starts (tokenize with --whole_word_mask)")
        batch["input_ids"], batch["labels"] = self.mask_rows(batch["input_ids"], seeds,
                                                             starts if self.whole_words else None)
        return batch

    def _pad(self, examples):
        starts = positions = None
        if isinstance(examples[0], dict) and (WORD_STARTS in examples[0] or STREAM_POSITION in examples[0]):
            starts = [e[WORD_STARTS] for e in examples] if WORD_STARTS in examples[0] else None
            # Streamed rows: where the stream goes on after each (utils.train.trainer.MLMTrainer keeps the last).
            positions = ([e[STREAM_POSITION] for e in examples] if STREAM_POSITION in examples[0] else None)
            examples = [{k: v for k, v in e.items() if k not in (WORD_STARTS, STREAM_POSITION)} for e in examples]
        batch = pad_without_fast_tokenizer_warning(
            self.tokenizer, examples, return_tensors="pt", pad_to_multiple_of=self.pad_to_multiple_of
        )
        batch.pop("special_tokens_mask", None)
        if starts is not None:
            # Padding is a special token: a word of its own that is never selected.
            padded = torch.ones(batch["input_ids"].shape, dtype=torch.bool)
            for row, row_starts in enumerate(starts):
                padded[row, : len(row_starts)] = torch.as_tensor(row_starts, dtype=torch.bool)
            batch[WORD_STARTS] = padded
        if positions is not None:
            batch[STREAM_POSITION] = torch.tensor(positions, dtype=torch.long)
        return batch

    def _pad_premasked(self, examples):
        """Batch examples masked ahead of time (the evaluation set): pad, never mask again."""
        labels = [e["labels"] for e in examples]
        rest = [{k: v for k, v in e.items() if k not in ("labels", WORD_STARTS)} for e in examples]
        batch = self._pad(rest)
        batch["labels"] = torch.full(batch["input_ids"].shape, -100, dtype=torch.long)
        for row, row_labels in enumerate(labels):
            batch["labels"][row, : len(row_labels)] = torch.as_tensor(row_labels)
        return batch

    def mask_rows(self, inputs: torch.Tensor, seeds: list[int] | torch.Generator,
                  word_starts: torch.Tensor | None = None, kind: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """Mask the rows of `inputs`, row i from a generator seeded by `seeds[i]` (or all from one generator).

        Returns (masked inputs, labels): labels hold the original id where a token was
        selected and -100 elsewhere. Special tokens are never selected. With `word_starts`
        (True where a token begins a word), each token takes the decisions drawn for the
        first token of its word, so words are selected, masked or replaced whole; the first
        token of a row always begins a word (the rest of a word cut by the block boundary).
        With `max_predictions`, a row keeps at most that many selected tokens (counted in
        `capped[kind]`). The numbers are drawn on the CPU and the rest runs where `inputs` are, with fixed
        shapes (no boolean indexing), so that a batch on a GPU or XLA device stays there.
        """
        rows, length = inputs.shape
        device = inputs.device
        select, replace, random_ids = self._draw(seeds, rows, length)
        select, replace, random_ids = select.to(device), replace.to(device), random_ids.to(device)
        if word_starts is not None:
            starts = word_starts.to(device=device, dtype=torch.bool).clone()
            starts[:, 0] = True
            positions = torch.arange(length, device=device).expand(rows, length)
            # The position of each token's word start: the last start at or before it.
            word_start = torch.cummax(torch.where(starts, positions, torch.zeros_like(positions)), dim=1).values
            select, replace = select.gather(1, word_start), replace.gather(1, word_start)

        special = (inputs.unsqueeze(-1) == self.special_ids.to(device)).any(-1)
        rate = self.mlm_probability if kind == "train" or self.eval_probability is None else self.eval_probability
        selected = (select < rate) & ~special
        if self.max_predictions is not None and self.max_predictions < length:
            drawn = selected
            selected = cap_selection(selected, select, self.max_predictions)
            self._tally(kind, drawn.sum() - selected.sum(), drawn.sum())
        labels = torch.where(selected, inputs, torch.full_like(inputs, -100))
        as_mask = selected & (replace < self.mask_replace_prob)
        as_random = selected & ~as_mask & (replace < self.mask_replace_prob + self.random_replace_prob)
        masked = torch.where(as_mask, torch.full_like(inputs, self.mask_token_id), inputs)
        masked = torch.where(as_random, random_ids.to(inputs.dtype), masked)
        return masked, labels

    def _draw(self, seeds: list[int] | torch.Generator, rows: int, length: int):
        """Per token: the selection draw, the replacement draw and a random id (CPU tensors)."""
        vocab = len(self.tokenizer)
        if isinstance(seeds, torch.Generator):
            return (torch.rand(rows, length, generator=seeds), torch.rand(rows, length, generator=seeds),
                    torch.randint(vocab, (rows, length), generator=seeds))
        select, replace = torch.empty(rows, length), torch.empty(rows, length)
        random_ids = torch.empty(rows, length, dtype=torch.long)
        generator = torch.Generator()
        for row, seed in enumerate(seeds):
            generator.manual_seed(seed)
            select[row].uniform_(generator=generator)
            replace[row].uniform_(generator=generator)
            random_ids[row].random_(0, vocab, generator=generator)
        return select, replace, random_ids

    def _tally(self, kind: str, dropped: torch.Tensor, drawn: torch.Tensor) -> None:
        before = self.capped.get(kind)
        self.capped[kind] = (dropped, drawn) if before is None else (before[0] + dropped, before[1] + drawn)

    def cap_report(self, kind: str) -> str | None:
        """A line on how many selected tokens the cap dropped (one device sync); None without a cap."""
        if self.max_predictions is None or kind not in self.capped:
            return None
        dropped, drawn = (int(t) for t in self.capped[kind])
        return (f"{dropped:,} of {drawn:,} selected tokens ({dropped / max(drawn, 1):.3%}) went over the cap of "
                f"{self.max_predictions} predictions per block (--max_predictions_per_seq) and were left unmasked")


def cap_selection(selected: torch.Tensor, draws: torch.Tensor, cap: int) -> torch.Tensor:
    """`selected` with at most `cap` True per row: those with the lowest `draws` (a uniformly random subset).

    Fixed shapes (two sorts), so it runs on XLA as on the CPU.
    """
    keyed = torch.where(selected, draws, torch.full_like(draws, 2.0))  # unselected last (draws are < 1)
    rank = keyed.argsort(dim=1, stable=True).argsort(dim=1, stable=True)
    return selected & (rank < cap)


def default_max_predictions(block_length: int, mlm_probability: float) -> int:
    """Slots per block for a fixed-size sparse head: the mean number of selected tokens plus three
    standard deviations (binomial), rounded up to a multiple of 8; about 1 block in 1000 has more."""
    mean = block_length * mlm_probability
    spread = math.sqrt(block_length * mlm_probability * (1 - mlm_probability))
    return min(block_length, 8 * math.ceil((mean + 3 * spread) / 8))


def mask_once(examples: dict, indices: list[int], collator: MLMCollator, seed: int) -> dict:
    """Mask rows of the evaluation set, each by (seed, its index in the set).

    So that every evaluation scores the same masked positions and eval losses compare
    across steps and runs (and map's batch size changes nothing).
    """
    rows = [dict(zip(examples, values)) for values in zip(*examples.values())]
    lengths = [len(row["input_ids"]) for row in rows]
    # Padding is a special token, so it is never selected.
    padded = collator._pad([{k: v for k, v in r.items() if k in ("input_ids", WORD_STARTS)} for r in rows])
    starts = padded.get(WORD_STARTS) if collator.whole_words else None
    masked_ids, labels = collator.mask_rows(padded["input_ids"], [row_seed(seed, _EVAL, i) for i in indices],
                                          word_starts=starts, kind="eval")
    masked = {"input_ids": [ids[:n].tolist() for ids, n in zip(masked_ids, lengths)],
              "labels": [lab[:n].tolist() for lab, n in zip(labels, lengths)]}
    if "attention_mask" in examples:  # padded rows (pad_to_max_length) keep their mask
        masked["attention_mask"] = examples["attention_mask"]
    return masked


def mask_eval_dataset(dataset, collator: MLMCollator, seed: int):
    """The evaluation set masked once, deterministically (see `mask_once`)."""
    return dataset.map(
        mask_once,
        with_indices=True,
        batched=True,
        fn_kwargs={"collator": collator, "seed": seed},
        remove_columns=dataset.column_names,
        desc="Masking the evaluation set once",
    )


def build_collator(tokenizer, data_args, training_args=None, max_predictions: int | None = None) -> MLMCollator:
    """The collator configured from the arguments; masks keyed by optimizer step when `training_args` are given.

    `max_predictions`: the cap of selected tokens per block (see `prediction_slots`).
    """
    layout = {}
    if training_args is not None:
        from utils.train.distributed import processes

        who = processes(training_args)
        layout = {
            "seed": training_args.seed,
            "rank": who.rank,
            "world_size": who.world,
        }
    # Rows padded to the longest of the batch (line_by_line) get lengths that suit matrix
    # units (tensor cores, AMX tiles) unless the user chose a multiple.
    pad_to_multiple_of = data_args.pad_to_multiple_of
    if pad_to_multiple_of is None and getattr(data_args, "line_by_line", False) and not data_args.pad_to_max_length:
        pad_to_multiple_of = 8
    return MLMCollator(
        tokenizer=tokenizer,
        mlm_probability=data_args.mlm_probability,
        eval_probability=eval_probability(data_args),
        mask_replace_prob=data_args.mask_replace_prob,
        random_replace_prob=data_args.random_replace_prob,
        # transformers' own whole-word path (offsets, mask token only) is not used: ours is.
        whole_word_mask=False,
        whole_words=data_args.whole_word_mask,
        pad_to_multiple_of=pad_to_multiple_of,
        max_predictions=max_predictions,
        **layout,
    )


def eval_probability(data_args) -> float:
    """The evaluation set's selection rate: --eval_mlm_probability, else BERT's 15% whatever the training rate,
    so that eval losses of runs trained at different rates compare."""
    return getattr(data_args, "eval_mlm_probability", None) or EVAL_MLM_PROBABILITY


def prediction_slots(data_args, block_length: int, fixed_slot_head: bool) -> int | None:
    """The cap of predicted tokens per block: --max_predictions_per_seq, else a default where the
    head predicts a fixed number of slots per block (`fixed_slot_head`: sparse prediction on XLA)."""
    if data_args.max_predictions_per_seq is not None:
        return min(data_args.max_predictions_per_seq, block_length)
    if fixed_slot_head:
        # Enough slots for the training and the evaluation rates both.
        return default_max_predictions(block_length, max(data_args.mlm_probability, eval_probability(data_args)))
    return None
