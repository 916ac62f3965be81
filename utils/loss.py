"""The MLM loss, averaged over the labelled tokens of the whole global batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor,
                   num_items_in_batch: torch.Tensor | int | None = None, all_labelled: bool = False) -> torch.Tensor:
    """Cross-entropy summed over labelled positions, divided by `num_items_in_batch`.

    `logits` are (..., vocab) for every position of `labels` (dense head) or for the
    labelled positions only (sparse head: `labels` holds just their targets, and
    `all_labelled` says so without a data-dependent check). The
    Trainer passes `num_items_in_batch`, the number of labelled tokens of the whole global
    batch (all processes, all accumulation steps), and scales for the processes itself, so
    the gradient is the exact mean over those tokens on 1 or N processes, with or without
    gradient accumulation. transformers' BERT-style models return a per-device mean
    instead, and their `forward(**kwargs)` makes the Trainer believe otherwise: their
    logged loss and gradients came out multiplied by the world size and by the
    accumulation steps. Without `num_items_in_batch` (evaluation) this is the mean.
    """
    labels = labels.to(logits.device)
    labelled = labels != -100
    if logits.device.type == "xla":
        # The number of labelled tokens changes every batch; selecting them would be a new
        # shape, hence a new XLA compilation, at every step. Keep the full shape instead.
        total = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    elif all_labelled:
        # Sparse head: every row is a labelled position already; selecting would copy them all.
        total = F.cross_entropy(logits.float(), labels, reduction="sum")
    else:
        # Only labelled rows enter the (fp32) softmax: ~15% of the positions of a dense head.
        total = F.cross_entropy(logits[labelled].float(), labels[labelled], reduction="sum")
    if num_items_in_batch is None:
        return total / labelled.sum().clamp(min=1)
    return total / num_items_in_batch
