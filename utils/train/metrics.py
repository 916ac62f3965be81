"""Evaluation metrics: masked-token accuracy counted on the device, and perplexity."""

from __future__ import annotations

import math
from pathlib import Path

import evaluate
import torch
from transformers import TrainerCallback

METRIC_DIR = Path(__file__).resolve().parents[2] / "metrics" / "masked_accuracy"


class MaskedAccuracy(TrainerCallback):
    """`compute_metrics` for the Trainer: counts right and labelled positions per batch, on the device.

    Use it as a callback too (it resets its counts after every evaluation). Called per
    batch (`batch_eval_metrics=True`), it returns the running accuracy as a device tensor,
    which costs no sync; the Trainer keeps the last one and converts it. Where the Trainer
    flags the last batch (`compute_result`), the shipped `evaluate` module computes the
    final value from the counts. On XLA the device loader never flags it, so the running
    value over all batches is the result there.
    """

    def __init__(self):
        # keep_in_memory: no cache files for a metric this small.
        self.metric = evaluate.load(str(METRIC_DIR), keep_in_memory=True)
        self.correct = self.counted = None

    def __call__(self, eval_prediction, compute_result: bool = True) -> dict:
        predictions = torch.as_tensor(eval_prediction.predictions)
        labels = torch.as_tensor(eval_prediction.label_ids, device=predictions.device)
        labelled = labels != -100
        correct = ((predictions == labels) & labelled).sum()
        counted = labelled.sum()
        self.correct = correct if self.correct is None else self.correct + correct
        self.counted = counted if self.counted is None else self.counted + counted
        if compute_result and predictions.device.type != "xla":
            self.metric.add_batch(correct=[int(self.correct.item())], counted=[int(self.counted.item())])
            self.reset()
            return {"accuracy": self.metric.compute()["accuracy"]}
        return {"accuracy": self.correct / self.counted.clamp(min=1)}

    def reset(self) -> None:
        self.correct = self.counted = None

    def on_evaluate(self, args, state, control, **kwargs):
        self.reset()


def perplexity(loss: float) -> float:
    """exp(loss), or inf when that overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")
