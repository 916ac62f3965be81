"""Training for a time budget (`--max_train_time 90m`): the learning-rate schedule runs over elapsed time.

Users think in time ("one night on this CPU", "a 2-hour preemptible slot"), and a schedule
sized in steps ends wherever the step count falls. With a budget, the schedule's position is
the fraction of the budget used, as in cramming's budget schedules: transformers' own schedule
(`--lr_scheduler_type`, `--warmup_steps`, `--lr_scheduler_kwargs`) is read at the step it
would have reached, `fraction x NOMINAL_STEPS`, so warm-up, hold and decay reach 0 at the
deadline, and training stops there. `--warmup_steps` below 1 is a fraction of the budget; a
whole number is that many real steps (warm-up is about the optimizer's statistics, not
time), and the rest of the schedule then runs over the time left.

What counts: the wall time of the training loop from its start, evaluations and checkpoint
saves during it included (the budget is the slot the user has); the data preparation before
it, and the final save, evaluation and fill-mask after it, do not. A resumed run goes on from
the time its checkpoint recorded.

One clock for every process: processes that read their own clocks would compute different
learning rates (their weights would drift apart) and stop at different steps (one would wait
forever in the next all-reduce). So the elapsed time is agreed: the largest of the processes'
clocks, exchanged in the background at each step end and read at the next (torch.distributed,
on a gloo side group), or every `XLA_AGREE_EVERY` steps through XLA's rendezvous. Between
agreements every process extrapolates from the same agreed figures, so the learning rate and
the decision to stop are the same everywhere. The estimate never goes back, so a decaying
schedule never rises again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
import time

import torch
from transformers import TrainerCallback

from utils.errors import UsageError

logger = logging.getLogger(__name__)

NOMINAL_STEPS = 10_000  # resolution of the schedule over the budget: its steps are fractions of it
BUDGET_FILE = "time_budget.json"  # in each checkpoint: the training time used up to it
XLA_AGREE_EVERY = 10  # steps between clock agreements on XLA, where each costs a rendezvous
UNBOUNDED_STEPS = 10**9  # max_steps when only the budget bounds the run
_UNITS = {"h": 3600.0, "m": 60.0, "min": 60.0, "s": 1.0, "": 1.0}


def _now() -> float:
    return time.monotonic()


def parse_duration(text: str) -> float:
    """Seconds in "90m", "2h", "1h30m", "45s", "3600" (seconds) or "1.5h"."""
    cleaned = str(text).strip().lower().replace(" ", "")
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|min|m|s|)", cleaned)
    if not cleaned or "".join(number + unit for number, unit in parts) != cleaned or \
            (len(parts) > 1 and any(unit == "" for _, unit in parts)):
        raise UsageError(f"--max_train_time {text!r} is not a duration; write e.g. 90m, 2h, 1h30m, 45s or 3600 "
                         "(seconds)")
    seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    if seconds <= 0:
        raise UsageError(f"--max_train_time {text!r} must be more than 0")
    return seconds


def describe_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def schedule_shape(training_args):
    """The factor of the peak learning rate at a nominal step in [0, NOMINAL_STEPS], and the warm-up in real steps.

    Built by transformers' own `get_scheduler`, so every schedule users know keeps its shape.
    """
    from transformers import get_scheduler

    kind = str(getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type))
    kwargs = dict(training_args.lr_scheduler_kwargs or {})
    if kind == "warmup_stable_decay":
        decay = kwargs.get("num_decay_steps", 0.2)
        if not 0 < decay < 1:
            raise UsageError(f"--lr_scheduler_kwargs num_decay_steps {decay}: with --max_train_time, give the decay "
                             "as a fraction of the budget, e.g. {\"num_decay_steps\": 0.2, \"decay_type\": \"1-sqrt\"}")
        kwargs["num_decay_steps"] = round(decay * NOMINAL_STEPS)
    warmup = training_args.warmup_steps
    warmup_steps = int(warmup) if warmup >= 1 else 0
    nominal_warmup = 0 if warmup >= 1 else math.ceil(warmup * NOMINAL_STEPS)
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = get_scheduler(kind, optimizer=dummy, num_warmup_steps=nominal_warmup,
                              num_training_steps=NOMINAL_STEPS, scheduler_specific_kwargs=kwargs)
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if not lambdas:
        raise UsageError(f"--lr_scheduler_type {kind} can't run over a time budget (it is not a function of the "
                         "step); use linear, cosine, constant_with_warmup or warmup_stable_decay with --max_train_time")
    return lambdas[0], warmup_steps


class _Alone:
    """One process: its own clock is the agreed one."""

    def exchange(self, step: int, elapsed: float):
        return step, elapsed

    def finish(self):
        pass


class _TorchAgreement:
    """The largest elapsed time of all processes, all-reduced in the background on a gloo group.

    Started at one step end and read at the next: no process waits for the others at a step
    end beyond what the last all-reduce took.
    """

    def __init__(self, group):
        self.group = group
        self.pending = None

    def exchange(self, step: int, elapsed: float):
        import torch.distributed as dist

        agreed = None
        if self.pending is not None:
            pending_step, value, work = self.pending
            work.wait()
            agreed = pending_step, float(value)
        value = torch.tensor(elapsed, dtype=torch.float64)
        self.pending = step, value, dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return agreed

    def finish(self):
        if self.pending is not None:  # every process started it: finish it before leaving the group
            self.pending[2].wait()
            self.pending = None


class _XLAAgreement:
    """The largest elapsed time of all replicas through XLA's rendezvous: at every step of the first
    2 x XLA_AGREE_EVERY (the first ones compile: their time says nothing of the steps after), then
    every XLA_AGREE_EVERY steps."""

    def exchange(self, step: int, elapsed: float):
        if step > 2 * XLA_AGREE_EVERY and step % XLA_AGREE_EVERY:
            return None
        import torch_xla.core.xla_model as xm

        # Eight bytes every time: the rendezvous gathers the payloads as a tensor of the longest
        # one's size, and the number as text (its length varies with its digits) gave that tensor
        # a new shape, so a compilation, whenever a longer one first came up mid-run.
        payloads = xm.rendezvous(f"run_mlm: time budget at step {step}", struct.pack("<d", elapsed))
        return step, max(struct.unpack("<d", p)[0] for p in payloads)

    def finish(self):
        pass


class TimeBudget(TrainerCallback):
    """Stops training at the deadline, and gives the learning-rate schedule the fraction of the budget used.

    `seconds`: the budget; `resumed`: what a checkpoint recorded (`load`), to go on from.
    """

    def __init__(self, seconds: float, resumed: dict | None = None):
        self.seconds = seconds
        resumed = resumed or {}
        self.elapsed_before = float(resumed.get("elapsed", 0.0))  # training time of earlier segments
        self.warmup_end = resumed.get("warmup_end")  # fraction of the budget when a step-counted warm-up ended
        self.agreement = _Alone()
        self.start = None
        self.points: list[tuple[int, float]] = []  # the last two agreed (step, elapsed)
        self.first_point = None  # the first agreed of this segment (after its first step: no start-up cost)
        self.first_step = 0
        self._scheduled = 0.0  # the largest fraction the schedule was given so far
        # Agreed seconds per step, from the last two agreed points (a resume starts from the checkpoint's).
        self._per_step = resumed.get("seconds_per_step")
        self.step = 0
        self.elapsed = self.elapsed_before  # the agreed estimate at the last step end
        self.reached = False  # stopped at the deadline
        self.segments = int(resumed.get("segments", 0)) + 1

    # -- The schedule --------------------------------------------------------------------------------

    @property
    def fraction(self) -> float:
        """The fraction of the budget used at the last step end, the same in every process."""
        return min(1.0, self.elapsed / self.seconds)

    def fraction_during(self, step: int) -> float:
        """The fraction of the budget at the middle of step `step + 1`, estimated from agreed figures only.

        The schedule sets step s + 1's learning rate when step s ends, before the clock is read
        there: the time comes from the last agreed point and the agreed time per step.
        """
        per_step = self._per_step or 0.0
        estimate = min(1.0, max(0.0, (self.elapsed + (step - self.step + 0.5) * per_step) / self.seconds))
        # Never back (the first steps compile, and their time per step overshoots the steps after).
        self._scheduled = max(self._scheduled, estimate)
        return self._scheduled

    def scheduler(self, optimizer, training_args):
        """A LambdaLR whose factor is transformers' schedule read at the budget fraction used."""
        shape, warmup_steps = schedule_shape(training_args)

        def factor(step: int) -> float:
            fraction = self.fraction_during(step)
            if warmup_steps:
                if step < warmup_steps:
                    return step / warmup_steps
                if self.warmup_end is None:
                    self.warmup_end = fraction
                rest = max(1e-9, 1.0 - self.warmup_end)
                return shape(min(1.0, max(0.0, (fraction - self.warmup_end) / rest)) * NOMINAL_STEPS)
            return shape(fraction * NOMINAL_STEPS)

        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step))

    # -- The clock ------------------------------------------------------------------------------------

    def _seconds_per_step(self) -> float | None:
        """From the last two agreed points (the first one's start: the segment's start)."""
        if not self.points:
            return None
        if len(self.points) == 1:
            step, elapsed = self.points[0]
            return (elapsed - self.elapsed_before) / max(step - self.first_step, 1)
        (s0, e0), (s1, e1) = self.points[-2:]
        return (e1 - e0) / max(s1 - s0, 1)

    def projected_steps(self) -> int | None:
        """Steps the run will have done at the deadline, at the speed of this segment since its first step."""
        if not self.points or self.first_point == self.points[-1]:
            return None
        (s0, e0), (s1, e1) = self.first_point, self.points[-1]
        per_step = (e1 - e0) / max(s1 - s0, 1)
        return self.step + max(0, int((self.seconds - self.elapsed) / max(per_step, 1e-9)))

    def on_train_begin(self, args, state, control, **kwargs):
        from utils.train.distributed import processes, vote_group

        who = processes(args)
        if who.backend == "torch":
            self.agreement = _TorchAgreement(vote_group(args))
        elif who.backend == "xla":
            self.agreement = _XLAAgreement()
        self.first_step = self.step = state.global_step
        self.start = _now()

    def on_step_end(self, args, state, control, **kwargs):
        self.step = state.global_step
        agreed = self.agreement.exchange(self.step, self.elapsed_before + _now() - self.start)
        if agreed is not None:
            self.first_point = self.first_point or agreed
            self.points = [*self.points[-1:], agreed]
        per_step = self._per_step = self._seconds_per_step()
        if per_step is None:  # nothing agreed yet (the first step with several processes)
            return
        last_step, last_elapsed = self.points[-1]
        # Never back: a new agreement after an extrapolation that ran ahead holds the schedule
        # still rather than raising the learning rate again.
        self.elapsed = max(self.elapsed, last_elapsed + (self.step - last_step) * per_step)
        # Stop when the next step would end more than half a step past the deadline.
        if self.elapsed + per_step / 2 >= self.seconds:
            self.reached = True
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        extra = {"budget_used": round(self.fraction, 4)}
        projected = self.projected_steps()
        if projected is not None:
            extra["projected_steps"] = projected
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)
        progress = _progress_bar(kwargs.get("callbacks", ()))
        if progress is not None and projected is not None:
            progress.total = projected
            progress.refresh()

    def on_train_end(self, args, state, control, **kwargs):
        self.agreement.finish()

    # -- Checkpoints and the summary ------------------------------------------------------------------

    def record(self) -> dict:
        return {"elapsed": self.elapsed, "step": self.step, "budget": self.seconds, "seconds_per_step": self._per_step,
                "warmup_end": self.warmup_end, "segments": self.segments}

    def save(self, checkpoint: str) -> None:
        """The training time used up to this checkpoint (the same in every process: the main one writes it)."""
        os.makedirs(checkpoint, exist_ok=True)
        with open(os.path.join(checkpoint, BUDGET_FILE), "w") as f:
            json.dump(self.record(), f)

    @staticmethod
    def load(checkpoint: str | None) -> dict | None:
        path = os.path.join(checkpoint, BUDGET_FILE) if checkpoint else None
        if path is None or not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def metrics(self) -> dict:
        return {"train_time_budget": self.seconds, "train_time_budget_used": round(self.elapsed, 1),
                "train_time_budget_reached": self.reached}

    def summary(self) -> str:
        how = "stopped at the deadline" if self.reached else "ended before the deadline (max_steps or epochs)"
        return (f"used {describe_duration(self.elapsed)} of {describe_duration(self.seconds)} "
                f"({self.fraction:.1%}) in {self.step} steps; {how}")


def _progress_bar(callbacks):
    for callback in callbacks:
        bar = getattr(callback, "training_bar", None)
        if bar is not None:
            return bar
    return None


def describe(budget: TimeBudget, training_args, other_limit: str | None) -> str:
    """The log line that says what the budget covers and what ends the run."""
    kind = str(getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type))
    warmup = training_args.warmup_steps
    warm = (f"warm-up {warmup:.0%} of it" if 0 < warmup < 1 else f"warm-up {int(warmup)} steps" if warmup else
            "no warm-up")
    ends = f"at the deadline or after {other_limit}, whichever comes first" if other_limit else "at the deadline"
    resumed = (f"; {describe_duration(budget.elapsed_before)} used before this resume" if budget.elapsed_before
               else "")
    return (f"{describe_duration(budget.seconds)} of training (evaluations and checkpoint saves during it count; data "
            f"preparation and the final save and evaluation do not); {kind} learning-rate schedule over the budget, "
            f"{warm}; training ends {ends}{resumed}")
