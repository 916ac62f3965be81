"""The Trainer, set up for MLM: masks drawn per optimizer step, token-averaged loss, streamed accuracy, checkpoints
that carry the stream position, the time budget and the run so far."""

from __future__ import annotations

import itertools
import logging
import os

import torch
from transformers import Trainer

from utils.backend import Backend
from utils.data.masking import STREAM_POSITION
from utils.model.mlm_head import predictions_at_labels
from utils.train.callbacks import NonFiniteGuard, ThroughputCallback
from utils.train.metrics import MaskedAccuracy
from utils.train.xla import XLAAutocast

logger = logging.getLogger(__name__)


def adjust_training_args(training_args) -> None:
    """What the Trainer must do for this MLM pipeline, each for a stated reason (utils.train.effective_args.settle
    calls it with the other changes; utils.tools.downstream for its fine-tuning)."""
    if not Backend.of(training_args).pins_memory:
        training_args.dataloader_pin_memory = False  # pinning needs an accelerator; on CPU it only warns
    # Every parameter of an MLM takes part in every step, so DDP's search for unused
    # parameters (transformers turns it on by default) only costs time.
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = False
    # Our accuracy streams batch by batch, so nothing is accumulated over the eval set.
    training_args.batch_eval_metrics = True
    # The datasets hold only what the collator reads; word_starts is not a model input, and
    # the Trainer would drop it before the collator saw it.
    training_args.remove_unused_columns = False


class MLMTrainer(XLAAutocast, Trainer):
    """The Trainer, with training masks drawn per optimizer step on the main process.

    `get_batch_samples` gathers the batches of one optimizer step; masking them there, by
    (seed, step, micro-batch), makes the masks independent of dataloader workers (each with
    its own copy of the collator), of a short last accumulation at an epoch end, and of the
    batches a resume skips or replays. It also comes before the Trainer counts the labelled
    tokens of the step, which the loss is averaged over.
    """

    data_checksum = None  # a tensor on the device: a weighted sum of every token id this process trained on
    stream_position = None  # streaming: where this process's share goes on after the rows trained on so far
    stream_resumed_from = None  # streaming: the checkpoint the stream resumed from, until its first step
    time_budget = None  # utils.train.budget.TimeBudget with --max_train_time: the schedule runs over elapsed time
    segments = None  # utils.train.segments.RunSegments: the run so far, recorded in each checkpoint

    def train(self, *args, **kwargs):
        if self.segments is not None:
            self.segments.start()
        return super().train(*args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None and self.time_budget is None:
            # warmup_stable_decay's decay may be a fraction of the steps, as warm-up may (the
            # from-scratch recipe gives it so: utils/train/recipe.py).
            kwargs = self.args.lr_scheduler_kwargs or {}
            decay = kwargs.get("num_decay_steps") if isinstance(kwargs, dict) else None
            if str(getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type)) == \
                    "warmup_stable_decay" and decay is not None and 0 < decay < 1:
                self.args.lr_scheduler_kwargs = {**kwargs, "num_decay_steps": max(1, round(decay * num_training_steps))}
        if self.time_budget is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        self.lr_scheduler = self.time_budget.scheduler(optimizer or self.optimizer, self.args)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        collator = self.data_collator
        batches = (self._count(self._take_position(batch))
                   for batch in itertools.islice(epoch_iterator, num_batches))
        if getattr(collator, "masks_by_step", False):
            step = self.state.global_step
            batches = (collator.mask_batch(batch, step, micro) for micro, batch in enumerate(batches))
        samples = super().get_batch_samples(batches, num_batches, device)
        if self.stream_resumed_from:
            # As the Trainer does after skipping batches: the random state the checkpoint saved,
            # restored once the first step's batches are in hand (starting the data loader
            # draws a seed), so that dropout goes on as in the uninterrupted run.
            self._load_rng_state(self.stream_resumed_from)
            self.stream_resumed_from = None
        return samples

    def _take_position(self, batch: dict) -> dict:
        positions = batch.pop(STREAM_POSITION, None)
        if positions is not None:
            self.stream_position = positions[-1].tolist()
        return batch

    def _save_checkpoint(self, model, trial):
        # Written before the Trainer's files, so a checkpoint that counts as complete (its
        # trainer_state.json is written last) has it: a resume then starts the stream there.
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        if self.stream_position is not None:
            from utils.data.streaming import save_position

            save_position(folder, self.args.process_index, self.args.world_size, self.stream_position)
        if self.time_budget is not None and self.args.should_save:
            self.time_budget.save(folder)  # the training time used so far: a resume goes on from it
        if self.segments is not None and self.args.should_save:
            self.segments.save(folder, self)  # the run so far: a resumed run reports the whole run
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            from utils.train.checkpoints import match_weight_file_modes

            match_weight_file_modes(folder)

    def _issue_warnings_after_load(self, load_result) -> None:
        # A checkpoint stores a tied weight (the MLM decoder's, BERT's decoder bias) under one
        # of its names; the others are "missing" although loading filled them. Warn only
        # about keys that are really missing.
        from utils.model.modeling import tied_parameter_names

        tied = tied_parameter_names(self.model)
        load_result.missing_keys[:] = [key for key in load_result.missing_keys if key not in tied]
        super()._issue_warnings_after_load(load_result)

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, NonFiniteGuard):
                callback.grad_norm, callback.applied = grad_norm, self.is_deepspeed_enabled
        return grad_norm

    def _count(self, batch: dict) -> dict:
        """Add the batch's ids (before masking) to `data_checksum`: processes that read the same data agree.

        Accumulated on the device, so it costs no synchronisation; read once after training.
        """
        ids = batch["input_ids"]
        weights = torch.arange(1, ids.numel() + 1, device=ids.device, dtype=torch.int64).view_as(ids) % 65521
        total = (ids.to(torch.int64) * weights).sum()
        self.data_checksum = total if self.data_checksum is None else self.data_checksum + total
        return batch


def build_trainer(model, tokenizer, training_args, train_dataset, eval_dataset, collator,
                  callbacks=None, tokens_per_step: int | None = None) -> Trainer:
    """A Trainer for a model whose forward computes the MLM loss (see `utils.model.mlm_head.install_mlm_head`).

    `training_args` as `utils.train.effective_args.settle` left them (it applies `adjust_training_args`).
    """
    accuracy = MaskedAccuracy() if eval_dataset is not None else None
    callbacks = [*(callbacks or []), *([accuracy] if accuracy else [])]
    trainer = MLMTrainer(
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
