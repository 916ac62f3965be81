"""The Trainer, set up for MLM: token-averaged loss, streamed accuracy, sane distributed defaults."""

from __future__ import annotations

import json
import logging
import os
import time

from transformers import Trainer, TrainerCallback

from utils.metrics import MaskedAccuracy
from utils.mlm_head import predictions_at_labels

logger = logging.getLogger(__name__)


def adjust_training_args(training_args) -> None:
    """Settings this script chooses unless the user did, each for a stated reason."""
    if training_args.device.type == "cpu":
        training_args.dataloader_pin_memory = False  # pinning needs an accelerator; on CPU it only warns
    # Every parameter of an MLM takes part in every step, so DDP's search for unused
    # parameters (transformers turns it on by default) only costs time.
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = False
    # Our accuracy streams batch by batch, so nothing is accumulated over the eval set.
    training_args.batch_eval_metrics = True


class ThroughputCallback(TrainerCallback):
    """Adds `tokens_seen` and `tokens_per_second` to the training logs (TensorBoard, trainer_state.json).

    Tokens per step are known in advance (global batch x block length; for line_by_line an
    upper bound, rows x max_seq_length), so nothing is synchronised with the device to
    count them. The rate
    covers training steps only: intervals with an evaluation or a save are left out.
    """

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.steps = self.seconds = 0.0
        self._last_end = None
        self._interrupted = False

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self._last_end is not None and not self._interrupted:
            self.steps += 1
            self.seconds += now - self._last_end
        self._last_end, self._interrupted = now, False

    def on_evaluate(self, args, state, control, **kwargs):
        self._interrupted = True

    def on_save(self, args, state, control, **kwargs):
        self._interrupted = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        extra = {"tokens_seen": state.global_step * self.tokens_per_step}
        if self.seconds > 0:
            extra["tokens_per_second"] = round(self.steps * self.tokens_per_step / self.seconds, 1)
            self.steps = self.seconds = 0.0
        logs.update(extra)
        # The Trainer stored a copy of the logs in the history before calling us.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)


def build_trainer(model, tokenizer, training_args, train_dataset, eval_dataset, collator,
                  callbacks=None, tokens_per_step: int | None = None) -> Trainer:
    """A Trainer for a model whose forward computes the MLM loss (see `utils.mlm_head.install_mlm_head`)."""
    adjust_training_args(training_args)
    accuracy = MaskedAccuracy() if eval_dataset is not None else None
    callbacks = [*(callbacks or []), *([accuracy] if accuracy else [])]
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=accuracy,
        # Predicted ids at the labelled positions only: no logits are kept.
        preprocess_logits_for_metrics=predictions_at_labels if accuracy else None,
        callbacks=callbacks,
    )
    if tokens_per_step:
        # Ahead of the reporting integrations (TensorBoard, ...), which log what they are given.
        reporters = [cb for cb in trainer.callback_handler.callbacks
                     if type(cb).__module__.startswith("transformers.integrations")]
        for reporter in reporters:
            trainer.remove_callback(reporter)
        trainer.add_callback(ThroughputCallback(tokens_per_step))
        for reporter in reporters:
            trainer.add_callback(reporter)
    return trainer


def checkpoint_step(checkpoint: str | None) -> int:
    """The optimizer step a checkpoint was saved at (0 without one)."""
    if checkpoint is None:
        return 0
    state = os.path.join(checkpoint, "trainer_state.json")
    if not os.path.exists(state):
        return 0
    with open(state, encoding="utf-8") as f:
        return int(json.load(f).get("global_step", 0))
