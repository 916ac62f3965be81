"""Evaluation metrics: masked-token accuracy without accumulating logits, and perplexity."""

from __future__ import annotations

import math
from pathlib import Path

import evaluate
import torch

METRIC_DIR = Path(__file__).resolve().parent.parent / "metrics" / "masked_accuracy"


def argmax_logits(logits, labels):
    """Keep only the predicted ids (batch x seq), never the batch x seq x vocab logits."""
    if isinstance(logits, tuple):  # some models return extra outputs
        logits = logits[0]
    return logits.argmax(dim=-1)


class MaskedAccuracy:
    """`compute_metrics` for the Trainer that streams masked positions into the shipped `evaluate` module.

    Works with `batch_eval_metrics=True` (called per batch, `compute_result` on the last)
    and without it (called once with everything).
    """

    def __init__(self):
        # keep_in_memory: no cache files for a metric this small.
        self.metric = evaluate.load(str(METRIC_DIR), keep_in_memory=True)

    def __call__(self, eval_prediction, compute_result: bool = True) -> dict:
        predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
        predictions = torch.as_tensor(predictions)
        labels = torch.as_tensor(labels)
        masked = labels != -100
        self.metric.add_batch(
            predictions=predictions[masked].cpu().numpy(), references=labels[masked].cpu().numpy()
        )
        if not compute_result:
            return {}
        result = self.metric.compute()
        return {"accuracy": result["accuracy"]}


def perplexity(loss: float) -> float:
    """exp(loss), or inf when that overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")
