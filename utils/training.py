"""The Trainer, set up for MLM: token-averaged loss, streamed accuracy, sane distributed defaults."""

from __future__ import annotations

import itertools
import logging
import os
import signal
import threading
import time

import torch
from transformers import Trainer, TrainerCallback

from utils.backend import Backend
from utils.distributed import vote_group
from utils.errors import RunError
from utils.masking import STREAM_POSITION
from utils.metrics import MaskedAccuracy
from utils.mlm_head import predictions_at_labels
from utils.xla import PreemptionVote, XLAAutocast

logger = logging.getLogger(__name__)


def adjust_training_args(training_args) -> None:
    """What the Trainer must do for this MLM pipeline, each for a stated reason (utils.effective_args.settle
    calls it with the other changes; utils.downstream for its fine-tuning)."""
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


class NonFiniteGradients(RunError):
    """Training stopped because a step's gradients were nan or inf (exit status 3)."""

    exit_code = 3
    prefix = "diverged"


class NonFiniteGuard(TrainerCallback):
    """Checks the gradients before every optimizer step; on nan/inf, stops the run or skips the step.

    The check runs after DDP's all-reduce, so every process sees the same verdict and
    they stop (or skip) together. Stopping raises before the bad step is applied, so no
    checkpoint holds its weights. Skipping drops the step's gradients: the optimizer
    leaves every parameter and its moments as they were. One device sync per step, which
    the Trainer's own loss logging already costs; off on XLA, where it would cut the graph.

    With fp16 loss scaling (a GradScaler, or DeepSpeed's own), a step whose scaled
    gradients overflow is normal: the scaler skips it and lowers the scale. The guard
    lets it, and stops only after `MAX_OVERFLOWS` such steps in a row, when no scale
    helps. Under DeepSpeed the engine applies the step inside backward, before this
    check: a non-finite step there stops the run after it was applied (`skip` is refused
    at start, see `check_nonfinite_option`).
    """

    MAX_OVERFLOWS = 20  # in a row: the scale fell 2**20-fold (from 65536 to 0.06), no longer an overflow

    def __init__(self, mode: str = "stop"):
        self.mode = mode
        self.skipped = 0
        self.overflows = 0  # fp16 steps in a row that the loss scaler skipped
        # The step's total gradient norm, when the Trainer computed one (MLMTrainer hands it
        # over): nan/inf exactly when a gradient is, so no second pass over the gradients.
        self.grad_norm = None
        self.applied = False  # DeepSpeed: the step was applied before the check (MLMTrainer says)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        norm, self.grad_norm = self.grad_norm, None
        if norm is not None:
            finite = bool(torch.isfinite(torch.as_tensor(norm)))
        else:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            finite = not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()))
        step = state.global_step + 1
        if finite:
            self.overflows = 0
            return
        if self._loss_scaled(optimizer):
            self.overflows += 1
            if self.overflows < self.MAX_OVERFLOWS:
                logger.info("Step %d: fp16 gradients overflowed; the loss scaler skips this step and lowers its scale "
                            "(%d in a row)", step, self.overflows)
                return
            self._stop(args, step, f"fp16 gradients overflowed in {self.overflows} steps in a row (the loss scaler "
                                   "skipped each and lowered its scale)")
        if self.applied:
            self._stop(args, step, "the loss or its gradients became nan/inf", applied=True)
        if self.mode == "skip":
            self.skipped += 1
            logger.warning("Step %d: non-finite gradients (nan/inf); skipping this batch (%d skipped so far)",
                           step, self.skipped)
            for p in model.parameters():
                p.grad = None
            return
        self._stop(args, step, "the loss or its gradients became nan/inf")

    def _loss_scaled(self, optimizer) -> bool:
        """Whether an fp16 loss scaler skips (or, under DeepSpeed, skipped) this step's overflow itself."""
        if self.applied:  # DeepSpeed stepped already; its fp16 optimizers record whether they skipped
            return bool(getattr(optimizer, "step_was_skipped", False))
        return getattr(optimizer, "scaler", None) is not None  # accelerate's GradScaler: skips in step()

    @staticmethod
    def _stop(args, step: int, what: str, applied: bool = False):
        last = _last_checkpoint_name(args.output_dir)
        when = ("after DeepSpeed applied it (its engine steps inside backward)" if applied
                else "stopped before applying it")
        raise NonFiniteGradients(
            f"{what} at step {step}; {when} "
            f"({'the last good checkpoint is ' + last if last else 'no checkpoint was saved yet'}). Lower "
            "--learning_rate, keep --max_grad_norm on, use bf16 rather than fp16"
            + ("" if applied else ", or pass --nonfinite_loss skip to skip such batches")
        )


def check_nonfinite_option(mode: str, deepspeed: bool) -> None:
    """Refuse `--nonfinite_loss skip` under DeepSpeed, whose engine applies a step before any callback sees it."""
    if mode == "skip" and deepspeed:
        from utils.errors import UsageError

        raise UsageError("--nonfinite_loss skip does not work with DeepSpeed: its engine applies each step inside "
                         "backward, before the gradients can be checked; use --nonfinite_loss stop (DeepSpeed's fp16 "
                         "loss scaler already skips overflowing steps)")


def _last_checkpoint_name(output_dir: str) -> str | None:
    from utils.checkpoints import last_complete_checkpoint

    return last_complete_checkpoint(output_dir) if os.path.isdir(output_dir) else None


class GracefulStop(TrainerCallback):
    """On SIGTERM (a preempted spot instance, a scheduler's time limit) or SIGINT (Ctrl-C): save and stop.

    The signal only sets a flag; at the end of a step the Trainer saves a checkpoint and
    leaves its loop, and the run exits without writing a final model, so that running the
    same command again resumes. A second signal stops at once. Used as a context manager,
    it also restores the handlers when the run raises.

    With several processes, the launcher forwards the signal to each of them, but not at
    the same instant: one could see it before a step's end and another just after, stop a
    step later, and the first would wait forever in the checkpoint's collectives (until
    the launcher kills both, checkpoint unfinished). So the processes vote: each step end
    starts an all-reduce of the signals seen (on a gloo group of its own, in the
    background), and the next step end reads it. All processes then stop after the same
    step, one step after the first of them was signalled, and without waiting on each
    other at any other step. `stopped` is the signal they agreed on (None: training ended
    on its own, even if a signal came during its last step).

    On XLA (TPU) the training runs in threads, where Python installs no signal handlers;
    there XLA's own preemption sync manager catches SIGTERM and picks the step at which
    every process stops (`utils.xla.PreemptionVote`). SIGINT is not caught there.
    """

    def __init__(self):
        self.signal = None  # what this process received
        self.stopped = None  # what the processes stopped for, at a step end
        self._previous = {}
        self._group = None
        self._vote = None  # (tensor, work) of the all-reduce started at the last step end
        self._xla = None  # utils.xla.PreemptionVote on XLA

    def on_train_begin(self, args, state, control, **kwargs):
        if Backend.of(args).xla:
            self._xla = PreemptionVote()
            return
        self._group = vote_group(args)
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name
        logger.warning("%s received: saving a checkpoint at the end of this step, then stopping (send it again to "
                       "stop at once)", self.signal)
        for other, previous in self._previous.items():
            signal.signal(other, previous)

    def on_step_end(self, args, state, control, **kwargs):
        agreed = self._agree(state.global_step)
        if agreed:
            self.stopped = agreed
            control.should_save = True
            control.should_training_stop = True

    def _agree(self, step: int) -> str | None:
        """The signal to stop for at this step end, the same in every process; None to go on."""
        if self._xla is not None:
            return "SIGTERM" if self._xla.reached(step) else None
        if self._group is None:
            return self.signal
        import torch.distributed as dist

        agreed = None
        if self._vote is not None:
            votes, work = self._vote
            work.wait()
            agreed = signal.Signals(int(votes)).name if int(votes) else None
        # SIGTERM (15) outranks SIGINT (2) when processes saw different ones.
        votes = torch.tensor(signal.Signals[self.signal].value if self.signal else 0, dtype=torch.int64)
        self._vote = votes, dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return agreed

    def on_train_end(self, args, state, control, **kwargs):
        if self._vote is not None:  # every process started it: finish it before leaving the group
            self._vote[1].wait()
            self._vote = None
        self.restore()

    def restore(self) -> None:
        """Give the signals back to the handlers they had before training began."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        # A run that raised never reached on_train_end: do not leave our handlers behind.
        self.restore()


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
    time_budget = None  # utils.budget.TimeBudget with --max_train_time: the schedule runs over elapsed time
    segments = None  # utils.segments.RunSegments: the run so far, recorded in each checkpoint

    def train(self, *args, **kwargs):
        if self.segments is not None:
            self.segments.start()
        return super().train(*args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None and self.time_budget is None:
            # warmup_stable_decay's decay may be a fraction of the steps, as warm-up may (the
            # from-scratch recipe gives it so: utils/recipe.py).
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
            from utils.streaming import save_position

            save_position(folder, self.args.process_index, self.args.world_size, self.stream_position)
        if self.time_budget is not None and self.args.should_save:
            self.time_budget.save(folder)  # the training time used so far: a resume goes on from it
        if self.segments is not None and self.args.should_save:
            self.segments.save(folder, self)  # the run so far: a resumed run reports the whole run
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            from utils.checkpoints import match_weight_file_modes

            match_weight_file_modes(folder)

    def _issue_warnings_after_load(self, load_result) -> None:
        # A checkpoint stores a tied weight (the MLM decoder's, BERT's decoder bias) under one
        # of its names; the others are "missing" although loading filled them. Warn only
        # about keys that are really missing.
        from utils.modeling import tied_parameter_names

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
    """A Trainer for a model whose forward computes the MLM loss (see `utils.mlm_head.install_mlm_head`).

    `training_args` as `utils.effective_args.settle` left them (it applies `adjust_training_args`).
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


class Interrupted(RunError):
    """The run was stopped by a signal after saving a checkpoint; the same command resumes it."""

    prefix = "stopped"

    def __init__(self, signal_name: str, step: int, output_dir: str):
        self.exit_code = 143 if signal_name == "SIGTERM" else 130  # the shell's 128 + signal number
        self._args = (signal_name, step, output_dir)
        super().__init__(f"{signal_name} at step {step}: saved {output_dir}/checkpoint-{step}; run the same command "
                         "to resume from it")

    def __reduce__(self):
        # torch_xla's launcher sends a replica's exception to the launching process pickled.
        return type(self), self._args


def save_final_model(trainer) -> None:
    """Save the trained model and tokenizer into output_dir so that no reader ever sees half a file.

    Everything is written to a temporary directory first (every process takes part, as
    sharded models are gathered), then each file is moved into place with an atomic rename,
    the weights last.
    """
    import shutil

    output_dir = trainer.args.output_dir
    tmp = os.path.join(output_dir, ".saving-final-model")
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(tmp)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        names = sorted(os.listdir(tmp), key=lambda n: (n.startswith("model") or n.startswith("pytorch_model"), n))
        from utils.checkpoints import match_weight_file_modes

        match_weight_file_modes(tmp)  # before the weights appear under their final name
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
        os.rmdir(tmp)
    trainer.accelerator.wait_for_everyone()
