"""What every training step logs and guards besides the loss: tokens per second, and steps with nan/inf gradients."""

from __future__ import annotations

import logging
import os
import time

import torch
from transformers import TrainerCallback

from utils.errors import RunError
from utils.train.checkpoints import last_complete_checkpoint

logger = logging.getLogger(__name__)


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
        last = last_complete_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
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
