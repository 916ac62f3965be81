"""Masked-token accuracy through the shipped `evaluate` module, batch by batch, without logits."""

import math

import numpy as np
import torch
from transformers import EvalPrediction

from utils.train.metrics import MaskedAccuracy, perplexity


def test_accuracy_counts_only_labelled_positions():
    metric = MaskedAccuracy()
    predictions = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    labels = torch.tensor([[5, -100, 0, -100], [-100, 2, -100, -100]])
    # 3 labelled positions, 2 right; the unlabelled positions (6, 8, 1, 3, 4) do not count.
    assert metric(EvalPrediction(predictions=predictions, label_ids=labels)) == {"accuracy": 2 / 3}


def test_batches_streamed_equal_one_shot():
    rng = np.random.default_rng(0)
    predictions = rng.integers(0, 5, size=(12, 10))
    labels = np.where(rng.random((12, 10)) < 0.3, rng.integers(0, 5, size=(12, 10)), -100)
    one_shot = MaskedAccuracy()(EvalPrediction(predictions=predictions, label_ids=labels))
    streamed = MaskedAccuracy()
    for start in range(0, 12, 4):
        last = start == 8
        result = streamed(EvalPrediction(predictions=predictions[start:start + 4], label_ids=labels[start:start + 4]),
                          compute_result=last)
        # Before the last batch: the running accuracy, as a tensor (no device sync).
        assert isinstance(result["accuracy"], torch.Tensor) != last
    expected = ((predictions == labels) & (labels != -100)).sum() / (labels != -100).sum()
    assert result["accuracy"] == one_shot["accuracy"] == expected
    # The state is reset after a result: a second evaluation starts from zero.
    assert streamed(EvalPrediction(predictions=predictions[:1], label_ids=predictions[:1]))["accuracy"] == 1.0


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(42)) == 42.0 or abs(perplexity(math.log(42)) - 42) < 1e-9
    assert perplexity(1e6) == float("inf")


def test_running_value_is_the_result_when_the_last_batch_is_never_flagged():
    # XLA's device loader never sets compute_result: the last running value must be the
    # accuracy over all batches, and the next evaluation must start from zero.
    metric = MaskedAccuracy()
    predictions = torch.tensor([[1, 2], [3, 4], [5, 6]])
    labels = torch.tensor([[1, -100], [0, 4], [5, -100]])
    for row in range(3):
        result = metric(EvalPrediction(predictions=predictions[row:row + 1], label_ids=labels[row:row + 1]),
                        compute_result=False)
    assert result["accuracy"].item() == 3 / 4
    metric.on_evaluate(None, None, None)
    result = metric(EvalPrediction(predictions=predictions[1:2], label_ids=labels[1:2]), compute_result=False)
    assert result["accuracy"].item() == 1 / 2
