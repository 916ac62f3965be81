"""A run stopped and resumed is still one run: its results and card cover every segment.

The Trainer reports only what the current call to `train()` did: after a resume,
`train_loss` averages the steps since the checkpoint and `train_runtime` is this segment's
time. Each checkpoint therefore records the run so far (the sum of the per-step losses, the
training time of the steps it holds, the number of segments, where the tokenizer came
from), and the resumed run adds its own part to it.
"""

from __future__ import annotations

import json
import os
import time

FILE = "run_segments.json"


class RunSegments:
    """The run so far, as the checkpoint resumed from recorded it (nothing for a fresh run)."""

    def __init__(self, checkpoint: str | None, tokenizer_source: str):
        earlier = {}
        if checkpoint and os.path.isfile(os.path.join(checkpoint, FILE)):
            with open(os.path.join(checkpoint, FILE)) as f:
                earlier = json.load(f)
        self.steps_before = int(earlier.get("steps", 0))
        self.loss_sum_before = float(earlier.get("loss_sum", 0.0))
        self.runtime_before = float(earlier.get("train_runtime", 0.0))
        self.segments = int(earlier.get("segments", 0)) + 1
        # A resume reads the tokenizer from the checkpoint (which save_total_limit may delete
        # later): the card names where the run's tokenizer first came from.
        self.tokenizer_source = earlier.get("tokenizer_source", tokenizer_source)
        self.started = time.time()

    def start(self) -> None:
        self.started = time.time()

    def save(self, folder: str, trainer) -> None:
        """Record the run up to this checkpoint (the losses the Trainer has not logged yet included)."""
        # (transformers 5 keeps both on the Trainer; the unlogged part is a tensor on the device.)
        unlogged = getattr(trainer, "_tr_loss", None)
        this_segment = getattr(trainer, "_total_loss_scalar", 0.0) + (float(unlogged) if unlogged is not None else 0.0)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, FILE), "w") as f:
            json.dump({"steps": trainer.state.global_step, "loss_sum": self.loss_sum_before + this_segment,
                       "train_runtime": self.runtime_before + time.time() - self.started,
                       "segments": self.segments, "tokenizer_source": self.tokenizer_source}, f, indent=1)

    def whole_run(self, metrics: dict, global_step: int) -> dict:
        """The Trainer's train metrics of this segment, turned into the whole run's."""
        metrics = dict(metrics, train_segments=self.segments)
        if self.segments == 1 or "train_loss" not in metrics:
            return metrics
        steps_now = max(global_step - self.steps_before, 0)
        runtime_now = metrics.get("train_runtime", 0.0)
        runtime = self.runtime_before + runtime_now
        metrics["train_loss"] = (self.loss_sum_before + metrics["train_loss"] * steps_now) / max(global_step, 1)
        metrics["train_runtime"] = round(runtime, 4)
        for key in ("train_samples_per_second", "train_steps_per_second"):
            if key in metrics and steps_now and runtime:  # the same work per step, over the whole time
                metrics[key] = round(metrics[key] * runtime_now / steps_now * global_step / runtime, 3)
        return metrics
