"""Masked-token accuracy, as an `evaluate` module loaded from this directory (no hub access).

Inputs are counts per batch, not token ids: callers count on the device where the
predictions are (GPU, TPU) and hand over two numbers per batch, so neither logits nor ids
have to be stored or copied (`utils.train.metrics.MaskedAccuracy` does the counting).
"""

import datasets
import evaluate

_DESCRIPTION = "Fraction of masked positions whose predicted token id equals the original token id."
_INPUTS = """
Args:
    correct (list of int): per batch, masked positions predicted right.
    counted (list of int): per batch, masked positions (labels other than -100).
Returns:
    accuracy (float): sum(correct) / sum(counted), 0.0 when nothing was counted.
    counted (int): sum(counted).
"""


class MaskedAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"correct": datasets.Value("int64"), "counted": datasets.Value("int64")}),
        )

    def _compute(self, correct, counted):
        n = int(sum(counted))
        return {"accuracy": int(sum(correct)) / n if n else 0.0, "counted": n}
