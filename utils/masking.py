"""The MLM collator: batches examples and masks tokens (80% [MASK] / 10% random / 10% kept by default)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import DataCollatorForLanguageModeling
from transformers.data.data_collator import pad_without_fast_tokenizer_warning

logger = logging.getLogger(__name__)

# Mixes (seed, step) into one generator seed; any large odd constant keeps streams apart.
_STEP_STRIDE = 1_000_003


@dataclass
class MLMCollator(DataCollatorForLanguageModeling):
    """`DataCollatorForLanguageModeling` with reproducible masks and a fast special-token mask.

    With `seed` set, the masks of a training batch are a function of the seed, the
    optimizer step and the row's position in the global batch only: every process draws
    the random numbers of the whole global batch (all processes, all accumulation steps)
    and keeps its own rows. The collator then only pads; `mask_batch` draws the masks on
    the main process, where the optimizer step is known (`utils.training.MLMTrainer` calls
    it for each step's batches). A run on 1 or N processes, with 0 or N dataloader workers,
    with or without gradient accumulation, or resumed from a checkpoint therefore masks the
    same tokens of the same examples. This needs rows of equal length (packed blocks or
    `pad_to_max_length`); with whole-word masking, masks come from the process's random
    generator as in transformers.

    Rows that already carry `labels` (the evaluation set, masked once) are only padded.
    The special-token mask comes from one comparison instead of a Python loop per row.
    """

    rank: int = 0
    world_size: int = 1
    accumulation_steps: int = 1

    def __post_init__(self):
        super().__post_init__()
        self.special_ids = torch.tensor(sorted(set(self.tokenizer.all_special_ids)), dtype=torch.long)
        self.mask_token_id = self.tokenizer.convert_tokens_to_ids(self.tokenizer.mask_token)

    @property
    def masks_by_step(self) -> bool:
        """Whether batches leave the collator unmasked, for `mask_batch` to mask by optimizer step."""
        return self.seed is not None and not self.whole_word_mask

    def torch_call(self, examples):
        if isinstance(examples[0], dict) and "labels" in examples[0]:
            return self._pad_premasked(examples)
        if self.whole_word_mask and isinstance(examples[0], dict) and "offset_mapping" in examples[0]:
            examples = _pad_offsets(examples, self.pad_to_multiple_of)
        if not self.masks_by_step:
            return super().torch_call(examples)
        # Masked later by `mask_batch`: a dataloader worker knows neither the optimizer step
        # nor where its batch falls in it.
        batch = self._pad(examples)
        batch.pop("special_tokens_mask", None)
        return batch

    def mask_batch(self, batch: dict, step: int, micro: int = 0) -> dict:
        """Mask a padded batch as micro-batch `micro` of optimizer step `step` on this process (in place).

        The generator is seeded by (seed, step): the same step draws the same numbers on
        every process and in every run, whatever the data loader did before.
        """
        if "labels" in batch:  # masked already (the evaluation set, or the parent's masking)
            return batch
        generator = torch.Generator().manual_seed(self.seed * _STEP_STRIDE + step)
        rows = batch["input_ids"].shape[0]
        first_row = (micro * self.world_size + self.rank) * rows
        global_rows = rows * self.world_size * self.accumulation_steps
        batch["input_ids"], batch["labels"] = self.mask_rows(batch["input_ids"], generator, first_row, global_rows)
        return batch

    def _pad(self, examples):
        return pad_without_fast_tokenizer_warning(
            self.tokenizer, examples, return_tensors="pt", pad_to_multiple_of=self.pad_to_multiple_of
        )

    def _pad_premasked(self, examples):
        """Batch examples masked ahead of time (the evaluation set): pad, never mask again."""
        labels = [e["labels"] for e in examples]
        rest = [{k: v for k, v in e.items() if k != "labels"} for e in examples]
        batch = self._pad(rest)
        batch["labels"] = torch.full(batch["input_ids"].shape, -100, dtype=torch.long)
        for row, row_labels in enumerate(labels):
            batch["labels"][row, : len(row_labels)] = torch.as_tensor(row_labels)
        return batch

    def mask_rows(self, inputs: torch.Tensor, generator: torch.Generator, first_row: int = 0,
                  global_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask `inputs` as rows [first_row, first_row + len(inputs)) of a draw over `global_rows` rows.

        Returns (masked inputs, labels): labels hold the original id where a token was
        selected and -100 elsewhere. Special tokens are never selected. The numbers are drawn
        on the CPU and the rest runs where `inputs` are, with fixed shapes (no boolean
        indexing), so that a batch already on a GPU or XLA device stays there.
        """
        rows, length = inputs.shape
        shape = (global_rows or rows, length)
        mine = slice(first_row, first_row + rows)
        device = inputs.device
        select = torch.rand(shape, generator=generator)[mine].to(device)
        replace = torch.rand(shape, generator=generator)[mine].to(device)
        random_ids = torch.randint(len(self.tokenizer), shape, generator=generator)[mine].to(device)

        special = (inputs.unsqueeze(-1) == self.special_ids.to(device)).any(-1)
        selected = (select < self.mlm_probability) & ~special
        labels = torch.where(selected, inputs, torch.full_like(inputs, -100))
        as_mask = selected & (replace < self.mask_replace_prob)
        as_random = selected & ~as_mask & (replace < self.mask_replace_prob + self.random_replace_prob)
        masked = torch.where(as_mask, torch.full_like(inputs, self.mask_token_id), inputs)
        masked = torch.where(as_random, random_ids.to(inputs.dtype), masked)
        return masked, labels

    def torch_mask_tokens(self, inputs, special_tokens_mask=None, offset_mapping=None):
        # The parent's path (whole-word masking, no seed): give it the fast special-token mask.
        if special_tokens_mask is None:
            special_tokens_mask = torch.isin(inputs, self.special_ids)
        return super().torch_mask_tokens(inputs, special_tokens_mask=special_tokens_mask,
                                         offset_mapping=offset_mapping)


def _pad_offsets(examples: list[dict], multiple: int | None) -> list[dict]:
    """Pad `offset_mapping` like `tokenizer.pad` pads the ids, with (0, 0) as for special tokens.

    `tokenizer.pad` pads input ids but not offsets, so unequal rows (line_by_line without
    padding) would not stack.
    """
    longest = max(len(e["input_ids"]) for e in examples)
    if multiple:
        longest = -(-longest // multiple) * multiple
    padded = []
    for e in examples:
        offsets = [list(pair) for pair in e["offset_mapping"]]
        offsets += [[0, 0]] * (longest - len(offsets))
        padded.append({**e, "offset_mapping": offsets})
    return padded


def mask_once(examples: dict, indices: list[int], collator: MLMCollator, seed: int) -> dict:
    """Mask a batch of rows with a generator seeded by (seed, position of the batch).

    Used on the evaluation set, so that every evaluation scores the same masked positions
    and eval losses compare across steps and runs.
    """
    rows = [dict(zip(examples, values)) for values in zip(*examples.values())]
    lengths = [len(row["input_ids"]) for row in rows]
    generator = torch.Generator().manual_seed(seed * _STEP_STRIDE + indices[0])
    if collator.whole_word_mask:
        saved, collator.generator = collator.generator, generator
        try:
            batch = DataCollatorForLanguageModeling.torch_call(collator, _pad_offsets(rows, None))
        finally:
            collator.generator = saved
        masked_ids, labels = batch["input_ids"], batch["labels"]
    else:
        # Padding is a special token, so it is never selected.
        padded = pad_without_fast_tokenizer_warning(
            collator.tokenizer, [{"input_ids": r["input_ids"]} for r in rows], return_tensors="pt"
        )
        masked_ids, labels = collator.mask_rows(padded["input_ids"], generator)
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


def build_collator(tokenizer, data_args, training_args=None) -> MLMCollator:
    """The collator configured from the arguments; masks keyed by optimizer step when `training_args` are given."""
    mask_replace_prob, random_replace_prob = data_args.mask_replace_prob, data_args.random_replace_prob
    if data_args.whole_word_mask and mask_replace_prob < 1:
        # transformers replaces whole words only with the mask token; say so once, plainly.
        logger.info("--whole_word_mask: selected words are always replaced by the mask token "
                    "(--mask_replace_prob 1, --random_replace_prob 0)")
        mask_replace_prob, random_replace_prob = 1.0, 0.0
    layout = {}
    if training_args is not None:
        layout = {
            "seed": training_args.seed,
            "rank": training_args.process_index,
            "world_size": training_args.world_size,
            "accumulation_steps": training_args.gradient_accumulation_steps,
        }
    # Rows padded to the longest of the batch (line_by_line) get lengths that suit matrix
    # units (tensor cores, AMX tiles) unless the user chose a multiple.
    pad_to_multiple_of = data_args.pad_to_multiple_of
    if pad_to_multiple_of is None and getattr(data_args, "line_by_line", False) and not data_args.pad_to_max_length:
        pad_to_multiple_of = 8
    return MLMCollator(
        tokenizer=tokenizer,
        mlm_probability=data_args.mlm_probability,
        mask_replace_prob=mask_replace_prob,
        random_replace_prob=random_replace_prob,
        whole_word_mask=data_args.whole_word_mask,
        pad_to_multiple_of=pad_to_multiple_of,
        **layout,
    )
