"""Numeric precision: bf16 mixed precision where the hardware runs it natively, fp32 elsewhere."""

from __future__ import annotations

import logging

from utils.errors import UsageError

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def native_bf16(device) -> tuple[bool, str]:
    """Whether `device` has bf16 matrix units, and a few words saying which device it is."""
    if device.type == "xla":
        import torch_xla.runtime as xr

        kind = xr.device_type()
        return kind == "TPU", f"XLA device {kind}"
    return False, f"{device.type} device"


def apply_precision(training_args, precision: str) -> str:
    """Set the run's mixed precision from --precision; returns it ("bf16", "fp16" or "no").

    "auto" keeps what --bf16/--fp16 or the accelerate config chose, and otherwise turns bf16
    on where the hardware has it. The TPU launcher does not pass the config's
    mixed_precision to the processes, so without this a TPU run would train in fp32.
    """
    chosen = training_args.mixed_precision  # from --bf16/--fp16 or ACCELERATE_MIXED_PRECISION
    if precision == "auto":
        has_bf16, device = native_bf16(training_args.device)
        if chosen == "no" and has_bf16:
            chosen = "bf16"
            logger.info("Precision: bf16 mixed precision (%s has bf16 matrix units; --precision fp32 to turn off)",
                        device)
    else:
        wanted = "no" if precision == "fp32" else precision
        flagged = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else None
        if flagged and flagged != wanted:
            raise UsageError(f"--precision {precision} contradicts --{flagged}; keep one of them")
        chosen = wanted
    training_args.mixed_precision = chosen
    training_args.bf16, training_args.fp16 = chosen == "bf16", chosen == "fp16"
    return chosen
