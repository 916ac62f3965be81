"""TPU / XLA: static shapes, an optimizer XLA accepts, and a count of graph compilations.

XLA compiles one graph per distinct input shape; a shape that changes from step to step
means a compilation per step, which looks like a hang. Everything here keeps the shapes
of training and evaluation batches fixed, and counts compilations to prove it.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from transformers import TrainerCallback
from transformers.training_args import OptimizerNames

from utils.backend import Backend
from utils.errors import UsageError

logger = logging.getLogger(__name__)

COMPILATIONS_FILE = "xla_compilations.json"


def on_xla(training_args) -> bool:
    """Whether this process trains on an XLA device (TPU, or torch_xla's CPU backend)."""
    return Backend.of(training_args).xla


def adapt_for_xla(training_args, data_args) -> list[str]:
    """Settings XLA needs, chosen unless the user already did; returns what was changed, to log."""
    changes = []
    if data_args.line_by_line and not data_args.pad_to_max_length:
        data_args.pad_to_max_length = True
        changes.append("--pad_to_max_length (one example length instead of one per batch)")
    if not training_args.dataloader_drop_last:
        training_args.dataloader_drop_last = True
        changes.append("--dataloader_drop_last (no smaller last batch)")
    if training_args.optim == OptimizerNames.ADAMW_TORCH_FUSED:
        # The fused kernel refuses XLA tensors ("fused=True requires ... but xla").
        training_args.optim = OptimizerNames.ADAMW_TORCH
        changes.append("--optim adamw_torch (the fused AdamW kernel does not take XLA tensors)")
    return changes


class XLAAutocast:
    """Trainer mixin: bf16 autocast on XLA when `utils.train.precision.apply_precision` chose it.

    transformers leaves autocast to accelerate, which on a TPU does not autocast bf16 but
    exports XLA_USE_BF16 (everything stored in bf16). Here the forward passes of training
    and evaluation run under `torch.autocast("xla", torch.bfloat16)`: matrix products in
    bf16, weights, gradients and AdamW's moments in fp32.
    """

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
        if getattr(self.args, "xla_autocast_bf16", False):
            import torch

            return torch.autocast("xla", dtype=torch.bfloat16)
        return super().autocast_smart_context_manager(cache_enabled)


def start_replicas_equal(model, world: int) -> bool:
    """With several replicas, give each the first replica's weights (on the device); returns whether it did.

    A model built from scratch takes its initial weights from torch's CPU random generator,
    which the replicas of one process share when torch_xla runs them as threads (TPU v2 and
    v3 cores, torch_xla's CPU backend): each would start from different weights, and
    averaging their gradients would not make them equal again.
    """
    if world <= 1:
        return False
    import torch_xla.core.xla_model as xm

    xm.broadcast_master_param(model)
    return True


def nonfinite_check_note(mode: str) -> str:
    """What becomes of --nonfinite_loss on XLA, as a line to log; `skip` is refused.

    The check reads every step's gradient norm on the host, which would cut the XLA graph
    (and force a compilation or a sync) every step.
    """
    if mode == "skip":
        raise UsageError("--nonfinite_loss skip is not supported on XLA (TPU): reading each step's gradients would "
                         "cut the graph every step; drop it, and watch the logged loss for nan")
    return ("nan/inf gradients are not checked (--nonfinite_loss has no effect on XLA: the check would cut the "
            "graph every step); watch the logged loss for nan")


def trim_to_full_batches(dataset, per_device_batch_size: int, world_size: int):
    """The first rows of `dataset` that fill whole batches on every process (static eval shapes)."""
    usable = len(dataset) - len(dataset) % (per_device_batch_size * world_size)
    if usable == 0:
        return dataset  # fewer rows than one global batch: drop_last would leave nothing to evaluate
    return dataset.select(range(usable)) if usable < len(dataset) else dataset


def compilation_count() -> int:
    """How many graphs torch_xla has compiled in this process so far."""
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


class CompilationCounter(TrainerCallback):
    """Counts torch_xla's graph compilations in each training step, logging step and evaluation.

    Warm-up lasts until every kind of step has run once: the first steps, the first
    logging step (it reads the loss) and the step after it (the running loss restarts).
    After that, a training step that compiles means a shape changed between steps. At the
    end, the counts go to `xla_compilations.json` in the output directory.
    """

    def __init__(self, min_warmup_steps: int = 3):
        self.warmup_steps = min_warmup_steps
        self._first_log_seen = False
        self.events: list[dict] = []  # {"event": "step"|"log"|"evaluation", "step": n, "compilations": new ones}
        self._last = 0

    def _record(self, event: str, step: int) -> None:
        count = compilation_count()
        self.events.append({"event": event, "step": step, "compilations": count - self._last})
        self._last = count

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = compilation_count()

    def on_step_end(self, args, state, control, **kwargs):
        self._record("step", state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # evaluate() logs its metrics before on_evaluate: its compilations are counted here.
        evaluation = any(key.startswith("eval_") for key in logs or {})
        self._record("evaluation" if evaluation else "log", state.global_step)
        if not evaluation and not self._first_log_seen:
            self._first_log_seen = True
            self.warmup_steps = max(self.warmup_steps, state.global_step + 1)

    def summary(self) -> dict:
        def per(kind):
            return [e["compilations"] for e in self.events if e["event"] == kind]

        steps = [e for e in self.events if e["event"] == "step"]
        return {
            "warmup_steps": self.warmup_steps,
            "training_compilations_in_warmup": sum(e["compilations"] for e in steps if e["step"] <= self.warmup_steps),
            "training_compilations_after_warmup": sum(e["compilations"] for e in steps
                                                      if e["step"] > self.warmup_steps),
            "compilations_per_evaluation": per("evaluation"),
            "compilations_per_log": per("log"),
            "events": self.events,
        }

    def save(self, output_dir: str) -> dict:
        summary = self.summary()
        Path(output_dir, COMPILATIONS_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")
        if summary["training_compilations_after_warmup"]:
            logger.warning("XLA compiled %d new graphs after the first %d training steps: some shape changes "
                           "between steps. Rerun with PT_XLA_DEBUG=1 to see why.",
                           summary["training_compilations_after_warmup"], summary["warmup_steps"])
        logger.info("XLA compilations: %d in the first %d training steps, %d after; per evaluation: %s; "
                    "per logging step: %s", summary["training_compilations_in_warmup"], summary["warmup_steps"],
                    summary["training_compilations_after_warmup"], summary["compilations_per_evaluation"],
                    summary["compilations_per_log"])
        return summary


_preemption_lock = threading.Lock()
_preemption_active = False


class PreemptionVote:
    """SIGTERM on XLA: every process learns of it at the same step, through XLA's preemption sync manager.

    Under torch_xla's launcher the training function runs in a worker thread (one per
    device), where Python cannot install signal handlers, so a SIGTERM would kill the run
    outright. XLA's distributed runtime catches SIGTERM itself, in any thread, and its
    coordination service agrees on a step at which every process (on every host) stops:
    `reached(step)` is True there, and only there, in all of them. The sync manager is
    started once per process, whichever of its replicas (threads) gets here first.
    """

    def __init__(self):
        global _preemption_active
        import torch_xla
        import torch_xla.runtime as xr

        with _preemption_lock:
            if not _preemption_active:
                try:
                    master = xr.get_master_ip()  # a TPU pod's first host
                except RuntimeError:  # no TPU metadata (torch_xla's CPU backend): this machine
                    master = "localhost"
                torch_xla._XLAC._ensure_xla_coordinator_initialized(xr.process_index(), xr.process_count(), master)
                torch_xla._XLAC._activate_preemption_sync_manager()
                _preemption_active = True
        self._reached = torch_xla._XLAC._sync_point_reached

    def reached(self, step: int) -> bool:
        """Whether the processes agreed to stop at this optimizer step (after a SIGTERM to any of them)."""
        return bool(self._reached(step))
