"""Numeric precision: bf16 mixed precision where the hardware runs it natively, fp32 elsewhere."""

from __future__ import annotations

import logging

import torch

from utils.errors import UsageError

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def _cpu_bf16() -> bool:
    try:  # private helpers of torch.cpu; read /proc/cpuinfo where they are missing
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    except AttributeError:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                flags = f.read()
        except OSError:
            return False
        return "amx_bf16" in flags or "avx512_bf16" in flags


def native_bf16(device) -> tuple[bool, str]:
    """Whether `device` has bf16 matrix units (TPU, Ampere+ GPU, CPU with AMX or AVX512-BF16), and its name."""
    if device.type == "xla":
        import torch_xla.runtime as xr

        kind = xr.device_type()
        return kind == "TPU", f"XLA device {kind}"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False), torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return _cpu_bf16(), "this CPU (AMX / AVX512-BF16)" if _cpu_bf16() else "this CPU"
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
