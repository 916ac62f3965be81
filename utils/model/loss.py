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
    else:
        # Sparse head: every row is a labelled position already; selecting would copy them all.
        # Dense head: only labelled rows enter the (fp32) softmax, ~15% of the positions.
        rows, targets = (logits, labels) if all_labelled else (logits[labelled], labels[labelled])
        if rows.device.type == "cpu":
            total = ChunkedCrossEntropySum.apply(rows, targets.long())
        else:
            total = F.cross_entropy(rows.float(), targets, reduction="sum")
    if num_items_in_batch is None:
        return total / labelled.sum().clamp(min=1)
    return total / num_items_in_batch


class ChunkedCrossEntropySum(torch.autograd.Function):
    """Summed cross-entropy of (rows, vocab) logits, in fp32, a few rows at a time.

    The same numbers as `F.cross_entropy(logits.float(), targets, reduction="sum")`, but
    without an fp32 copy of all the logits, its log-softmax, and their gradients, each
    (rows x vocab) and read and written once more per pass: on CPU a chunk of rows stays
    in cache from cast to exp to gradient. Measured on 300 x 30522 bf16 logits (a batch
    of 16 x 128 at 15% masking): 18 ms forward and backward against 58 ms.
    """

    CHUNK = 16

    @staticmethod
    def forward(ctx, logits, targets):
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], ChunkedCrossEntropySum.CHUNK):
            rows = slice(start, start + ChunkedCrossEntropySum.CHUNK)
            lse[rows] = torch.logsumexp(logits[rows].float(), dim=-1)
        picked = logits.gather(1, targets[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, targets, lse)
        return (lse - picked).sum()

    @staticmethod
    def backward(ctx, grad_output):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        in_place = logits.dtype == torch.float32  # fp32 logits: compute each chunk in grad itself, no copy back
        for start in range(0, logits.shape[0], ChunkedCrossEntropySum.CHUNK):
            rows = slice(start, start + ChunkedCrossEntropySum.CHUNK)
            if in_place:
                probs = torch.sub(logits[rows], lse[rows, None], out=grad[rows]).exp_()  # softmax
            else:
                probs = (logits[rows].float() - lse[rows, None]).exp_()
            chunk_targets = targets[rows]
            probs[torch.arange(len(chunk_targets), device=probs.device), chunk_targets] -= 1
            probs.mul_(grad_output)
            if not in_place:
                grad[rows] = probs
        return grad, None
