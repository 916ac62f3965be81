"""The Trainer, set up for MLM: token-averaged loss, streamed accuracy, sane distributed defaults."""

from __future__ import annotations

import json
import logging
import os

from transformers import Trainer

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


def build_trainer(model, tokenizer, training_args, train_dataset, eval_dataset, collator,
                  callbacks=None) -> Trainer:
    """A Trainer for a model whose forward computes the MLM loss (see `utils.mlm_head.install_mlm_head`)."""
    adjust_training_args(training_args)
    accuracy = MaskedAccuracy() if eval_dataset is not None else None
    callbacks = [*(callbacks or []), *([accuracy] if accuracy else [])]
    return Trainer(
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


def checkpoint_step(checkpoint: str | None) -> int:
    """The optimizer step a checkpoint was saved at (0 without one)."""
    if checkpoint is None:
        return 0
    state = os.path.join(checkpoint, "trainer_state.json")
    if not os.path.exists(state):
        return 0
    with open(state, encoding="utf-8") as f:
        return int(json.load(f).get("global_step", 0))
