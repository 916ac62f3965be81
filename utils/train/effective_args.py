"""The effective arguments: every change this script makes to the arguments it parsed, in one place.

transformers builds TrainingArguments (and DeepSpeed's plugin) from the flags. A few values
then depend on what only the run knows: the hardware (the precision, pinned memory), the
backend (XLA's static shapes), a time budget, a streamed dataset, what the Trainer must hand
the collator. `settle` makes each of those changes, for a stated reason, before anything is
built from the arguments, and returns them as one list: the log shows it once, the Trainer
gets the settled arguments, and `effective_args.json` in the output directory keeps all of
them with the changes (`save`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from contextlib import contextmanager

from utils.train.model_card import SECRET_FIELDS, _plain

logger = logging.getLogger(__name__)

EFFECTIVE_ARGS_FILE = "effective_args.json"


@dataclasses.dataclass
class Change:
    name: str
    before: object
    after: object
    why: str

    def __str__(self) -> str:
        return f"{self.name}: {self.before!r} -> {self.after!r} ({self.why})"


class Changes(list):
    """The changes made to some argument objects, each with why (compared field by field around a step)."""

    def __init__(self, *groups):
        super().__init__()
        self.groups = groups

    def _values(self) -> dict:
        values = {}
        for group in self.groups:
            for f in dataclasses.fields(group):
                if not f.name.startswith("_"):
                    values[f.name] = _plain(getattr(group, f.name, None))
            # Set outside the fields by transformers or by utils.train.precision (no dataclass field).
            for name in ("mixed_precision", "xla_autocast_bf16"):
                if hasattr(group, name) and name not in values:
                    values[name] = _plain(getattr(group, name))
        values["dispatch_batches"] = next(
            (getattr(g.accelerator_config, "dispatch_batches", None) for g in self.groups
             if hasattr(g, "accelerator_config")), None)
        return values

    @contextmanager
    def step(self, why: str):
        """Record what the code in the `with` block changes, as done for `why`."""
        before = self._values()
        yield
        after = self._values()
        for name, value in after.items():
            if value != before.get(name):
                self.append(Change(name, before.get(name), value, why))

    def describe(self) -> str:
        return "\n".join(f"  {change}" for change in self) or "  (none)"


def _precision_and_shapes(changes: Changes, training_args, precision: str, shapes, cache_dir, data_args) -> None:
    """The steps run_mlm.py and the downstream tool share: the precision, then on XLA the static shapes."""
    from utils.train import xla
    from utils.train.precision import apply_precision

    with changes.step(f"--precision {precision}"):
        apply_precision(training_args, precision, shapes, cache_dir)
    if xla.on_xla(training_args):
        with changes.step("XLA: static shapes, so the graph compiles once"):
            for change in xla.adapt_for_xla(training_args, data_args):
                logger.info("XLA: set %s", change)


def settle(model_args, data_args, training_args, *, tensorboard_default: bool, time_budget_only: bool,
           stream_resumed: bool, precision_shapes=None, cache_dir=None) -> Changes:
    """Set what the run decides, in this order, and return what changed.

    - `tensorboard_default`: --report_to was not given and TensorBoard is installed: log to it.
    - the precision (`--precision`, utils.train.precision: on a CPU timed at the model's shapes);
    - on XLA, the settings that keep shapes static (utils.train.xla);
    - `time_budget_only`: a --max_train_time with neither --max_steps nor epochs given: the
      budget alone ends the run;
    - streaming: each process reads its own shards; `stream_resumed`: the stream starts where
      the checkpoint says, so the Trainer skips no batches;
    - what the Trainer must do for the MLM pipeline (utils.train.trainer.adjust_training_args).
    """
    from utils.train import budget
    from utils.train.trainer import adjust_training_args

    changes = Changes(model_args, data_args, training_args)
    if tensorboard_default:
        with changes.step("TensorBoard is installed; --report_to none turns it off"):
            training_args.report_to = ["tensorboard"]
    _precision_and_shapes(changes, training_args, model_args.precision, precision_shapes, cache_dir, data_args)
    if time_budget_only:
        with changes.step("--max_train_time alone ends the run"):
            training_args.max_steps = budget.UNBOUNDED_STEPS
    if data_args.streaming:
        with changes.step("--streaming: each process reads its own shards of the stream"):
            training_args.accelerator_config.dispatch_batches = False
        if stream_resumed:
            with changes.step("the stream resumes where the checkpoint says; no batches to skip"):
                training_args.ignore_data_skip = True
    with changes.step("the MLM pipeline (utils.train.trainer.adjust_training_args)"):
        adjust_training_args(training_args)
    return changes


def settle_for_finetuning(args, training_args, *, precision_shapes=None, cache_dir=None) -> Changes:
    """The same, for utils.tools.downstream's fine-tuning runs (`args`: its DownstreamArguments): no checkpoints
    (each model is scored, not kept), the precision, XLA's static shapes (every sequence padded to
    --max_seq_length), and what the Trainer must do for the pipeline."""
    from types import SimpleNamespace

    from utils.train.trainer import adjust_training_args

    changes = Changes(training_args)
    with changes.step("a fine-tuning run is scored, not kept"):
        training_args.save_strategy = "no"
    # Every sequence padded to --max_seq_length on XLA.
    _precision_and_shapes(changes, training_args, args.precision, precision_shapes, cache_dir,
                          SimpleNamespace(line_by_line=False, pad_to_max_length=True))
    with changes.step("the pipeline (utils.train.trainer.adjust_training_args)"):
        adjust_training_args(training_args)
    return changes


def save(output_dir: str, changes: Changes, *arg_groups) -> str:
    """Write every argument as the run used it, and what this script changed, to `effective_args.json`."""
    from transformers import TrainingArguments

    groups = {}
    for group in arg_groups:
        if isinstance(group, TrainingArguments):
            values = group.to_dict()  # its own copy, with the hub token replaced by a placeholder
        else:
            values = {f.name: _plain(getattr(group, f.name)) for f in dataclasses.fields(group)}
        groups[type(group).__name__] = {k: ("<hidden>" if k in SECRET_FIELDS and v else v) for k, v in values.items()}
    path = os.path.join(output_dir, EFFECTIVE_ARGS_FILE)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"changed_by_this_script": [str(c) for c in changes], **groups}, f, indent=1, default=str)
    os.replace(tmp, path)
    return path
