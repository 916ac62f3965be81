"""SIGTERM and SIGINT turned into "save a checkpoint at the end of this step, then stop", agreed by every process."""

from __future__ import annotations

import logging
import os
import signal
import threading

import torch
from transformers import TrainerCallback

from utils.backend import Backend
from utils.errors import RunError
from utils.train.checkpoints import last_complete_checkpoint
from utils.train.distributed import vote_group
from utils.train.xla import PreemptionVote

logger = logging.getLogger(__name__)


def _last_checkpoint_name(output_dir: str) -> str | None:
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
    every process stops (`utils.train.xla.PreemptionVote`). SIGINT is not caught there.
    """

    def __init__(self):
        self.signal = None  # what this process received
        self.stopped = None  # what the processes stopped for, at a step end
        self._previous = {}
        self._group = None
        self._vote = None  # (tensor, work) of the all-reduce started at the last step end
        self._xla = None  # utils.train.xla.PreemptionVote on XLA

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
