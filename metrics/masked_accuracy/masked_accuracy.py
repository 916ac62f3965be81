"""Masked-token accuracy, as an `evaluate` module loaded from this directory (no hub access).

Predictions and references are token ids at the positions that carry a label; positions
labelled -100 (not masked) are ignored, so callers may pass whole rows as well.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Fraction of masked positions whose predicted token id equals the original token id."
_INPUTS = """
Args:
    predictions (list of int): predicted token ids.
    references (list of int): original token ids; -100 marks positions to ignore.
Returns:
    accuracy (float): correct / counted positions (0.0 when no position is counted).
    counted (int): number of positions counted.
"""


class MaskedAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        counted = references != -100
        n = int(counted.sum())
        correct = int((predictions[counted] == references[counted]).sum())
        return {"accuracy": correct / n if n else 0.0, "counted": n}
