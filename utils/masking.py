"""The MLM collator: batches examples and masks tokens (80% [MASK] / 10% random / 10% kept by default)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import DataCollatorForLanguageModeling

logger = logging.getLogger(__name__)


@dataclass
class MLMCollator(DataCollatorForLanguageModeling):
    """`DataCollatorForLanguageModeling` that finds special tokens with one `torch.isin`.

    The parent calls `tokenizer.get_special_tokens_mask` on every row in Python when the
    dataset stores no `special_tokens_mask`; we store only input ids, so we derive the
    mask from the tokenizer's special ids instead (the same ids that method checks).
    """

    def __post_init__(self):
        super().__post_init__()
        self.special_ids = torch.tensor(sorted(set(self.tokenizer.all_special_ids)), dtype=torch.long)

    def torch_call(self, examples):
        if isinstance(examples[0], dict) and "labels" in examples[0]:
            return self._pad_premasked(examples)
        if self.whole_word_mask and isinstance(examples[0], dict) and "offset_mapping" in examples[0]:
            examples = _pad_offsets(examples, self.pad_to_multiple_of)
        return super().torch_call(examples)

    def _pad_premasked(self, examples):
        """Batch examples masked ahead of time (the evaluation set): pad, never mask again."""
        labels = [e["labels"] for e in examples]
        rest = [{k: v for k, v in e.items() if k != "labels"} for e in examples]
        batch = self.tokenizer.pad(rest, return_tensors="pt", pad_to_multiple_of=self.pad_to_multiple_of)
        batch["labels"] = torch.full(batch["input_ids"].shape, -100, dtype=torch.long)
        for row, row_labels in enumerate(labels):
            batch["labels"][row, : len(row_labels)] = torch.as_tensor(row_labels)
        return batch

    def torch_mask_tokens(self, inputs, special_tokens_mask=None, offset_mapping=None):
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
    """Mask a batch of examples with a generator seeded by (seed, position of the batch).

    Used on the evaluation set, so that every evaluation scores the same masked positions
    and eval losses compare across steps and runs.
    """
    rows = [dict(zip(examples, values)) for values in zip(*examples.values())]
    lengths = [len(row["input_ids"]) for row in rows]
    saved = collator.generator
    collator.generator = torch.Generator().manual_seed(seed * 1_000_003 + indices[0])
    try:
        batch = collator.torch_call(rows)
    finally:
        collator.generator = saved
    masked = {"input_ids": [ids[:n].tolist() for ids, n in zip(batch["input_ids"], lengths)],
              "labels": [lab[:n].tolist() for lab, n in zip(batch["labels"], lengths)]}
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


def build_collator(tokenizer, data_args) -> MLMCollator:
    """The collator configured from the data arguments."""
    mask_replace_prob, random_replace_prob = data_args.mask_replace_prob, data_args.random_replace_prob
    if data_args.whole_word_mask and mask_replace_prob < 1:
        # transformers replaces whole words only with the mask token; say so once, plainly.
        logger.info("--whole_word_mask: selected words are always replaced by the mask token "
                    "(--mask_replace_prob 1, --random_replace_prob 0)")
        mask_replace_prob, random_replace_prob = 1.0, 0.0
    return MLMCollator(
        tokenizer=tokenizer,
        mlm_probability=data_args.mlm_probability,
        mask_replace_prob=mask_replace_prob,
        random_replace_prob=random_replace_prob,
        whole_word_mask=data_args.whole_word_mask,
        pad_to_multiple_of=data_args.pad_to_multiple_of,
    )
