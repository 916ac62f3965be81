"""Numeric precision: bf16 mixed precision where it is faster on the hardware at hand, fp32 elsewhere.

GPUs and TPUs with bf16 units train in bf16. CPUs differ: with AMX (Sapphire Rapids and
later) a bf16 matmul runs about 6x fp32; with AVX512-BF16 but no AMX (Cooper Lake, AMD Zen
4/5) it runs at half to three quarters of fp32, and bf16 autocast slows training down. A CPU
flag cannot tell the two apart reliably (oneDNN may be limited by ONEDNN_MAX_CPU_ISA, a VM
may hide units), so on a CPU `--precision auto` times a bf16 and an fp32 matmul at the
model's own shapes for a fraction of a second, once per CPU, torch version, thread count
and shape (cached), and takes bf16 only where it clearly wins.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from utils.backend import Backend
from utils.errors import UsageError
from utils.train.distributed import compute_once

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# bf16 autocast casts every weight and activation it multiplies, each step: its matmuls have
# to win clearly for training to be faster. Measured: AMX 4-6x (bf16 faster), AVX512-BF16
# without AMX 0.5-0.75x (fp32 faster); see bench/RESULTS.md.
BF16_MARGIN = 1.25
CACHE_FILE = "cpu_precision.json"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


def _cpu_bf16() -> bool:
    try:  # private helpers of torch.cpu; read /proc/cpuinfo where they are missing
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    except AttributeError:
        flags = _cpu_flags()
        return "amx_bf16" in flags or "avx512_bf16" in flags


def cpu_description() -> str:
    """The CPU model and its bf16 features, e.g. "Intel(R) Xeon(R) ... (AMX, AVX512-BF16)"."""
    info = _cpu_flags()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 "unknown CPU")
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    features = [name for name, flag in (("AMX", "amx_bf16"), ("AVX512-BF16", "avx512_bf16")) if flag in flags]
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return f"{model} ({', '.join(features) or 'no bf16 units'}{f'; ONEDNN_MAX_CPU_ISA={limit}' if limit else ''})"


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


def gemm_shapes(config, tokens: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of a transformer layer's big matrix products for `tokens` tokens: attention projections, the MLP."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "dim", None) or 768
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "hidden_dim", None) or 4 * hidden
    return [(tokens, hidden, hidden), (tokens, hidden, intermediate), (tokens, intermediate, hidden)]


def matmul_rates(shapes: list[tuple[int, int, int]], seconds: float = 0.15) -> dict[str, float]:
    """GFLOP/s of bf16 and fp32 matmuls of `shapes` in this process, each dtype timed for about `seconds`."""
    rates = {}
    for dtype in (torch.bfloat16, torch.float32):
        pairs = [(torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)) for m, k, n in shapes]
        flops = sum(2 * m * k * n for m, k, n in shapes)
        for a, b in pairs:  # warm-up: first calls pick and prepare kernels
            a @ b
        rounds, start = 0, time.perf_counter()
        while rounds < 2 or time.perf_counter() - start < seconds:
            for a, b in pairs:
                a @ b
            rounds += 1
        rates[str(dtype).removeprefix("torch.")] = flops * rounds / (time.perf_counter() - start) / 1e9
    return rates


def cpu_precision(shapes: list[tuple[int, int, int]], cache_dir: Path | None = None) -> tuple[str, dict, str]:
    """("bf16" or "no", the rates, where they came from): bf16 where its matmuls beat fp32's by BF16_MARGIN."""
    key = "|".join([cpu_description(), f"torch {torch.__version__}", f"{torch.get_num_threads()} threads",
                    str(shapes)])
    cache = Path(cache_dir) / CACHE_FILE if cache_dir else None
    known = {}
    if cache is not None and cache.exists():
        try:
            known = json.loads(cache.read_text())
        except (OSError, ValueError):
            known = {}
    if key in known:
        rates, origin = known[key], f"measured earlier, cached in {cache}"
    else:
        started = time.perf_counter()
        rates = matmul_rates(shapes)
        origin = f"measured in {time.perf_counter() - started:.2f} s"
        if cache is not None:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
                tmp.write_text(json.dumps({**known, key: rates}, indent=1))
                os.replace(tmp, cache)
                origin += f", cached in {cache}"
            except OSError:
                pass
    return ("bf16" if rates["bfloat16"] >= BF16_MARGIN * rates["float32"] else "no"), rates, origin


def _auto_precision(device, shapes, cache_dir) -> tuple[str, str | None]:
    """What --precision auto picks on this device ("bf16" or "no"), and the line that says why."""
    has_bf16, name = native_bf16(device)
    if not has_bf16:
        return "no", None
    if device.type != "cpu" or not shapes:
        return "bf16", f"Precision: bf16 mixed precision ({name} has bf16 matrix units; --precision fp32 to turn off)"
    chosen, rates, origin = cpu_precision(shapes, cache_dir)
    return chosen, (
        f"Precision: {'bf16 mixed precision' if chosen == 'bf16' else 'fp32'} (on {cpu_description()}, at the model's "
        f"shapes, a bf16 matmul runs at {rates['bfloat16']:.0f} GFLOP/s and fp32 at {rates['float32']:.0f}; bf16 is "
        f"used where it is {BF16_MARGIN:.2f}x fp32 or more; {origin}). --precision fp32 or bf16 to choose")


def apply_precision(training_args, precision: str, shapes: list[tuple[int, int, int]] | None = None,
                    cache_dir: Path | None = None) -> str:
    """Set the run's mixed precision from --precision; returns it ("bf16", "fp16" or "no").

    "auto" keeps what --bf16/--fp16 or the accelerate config chose, and otherwise turns bf16
    on where the hardware runs it faster: on GPUs and TPUs with bf16 units, and on a CPU
    where a bf16 matmul at the model's `shapes` beats fp32 (timed, see `cpu_precision`).
    The TPU launcher does not pass the config's mixed_precision to the processes, so
    without this a TPU run would train in fp32.

    On XLA, bf16 is autocast by the Trainer (`utils.train.xla.XLAAutocast`), with fp32 weights,
    and accelerate is told "no": given "bf16" on a TPU, accelerate exports XLA_USE_BF16=1,
    which stores every weight, gradient and optimizer state in bf16 (and Pallas kernels
    refuse it). `training_args.xla_autocast_bf16` says which happened.
    """
    chosen = training_args.mixed_precision  # from --bf16/--fp16 or ACCELERATE_MIXED_PRECISION
    if precision == "auto":
        if chosen == "no":
            # Decided once, by the first process, for every process on every machine: nodes
            # that timed their own CPUs (or have different GPUs) could train in different
            # precisions. The other processes wait meanwhile, so nothing else loads the CPUs.
            chosen, line = compute_once(training_args, lambda: _auto_precision(training_args.device, shapes, cache_dir),
                                        "choosing the precision")
            if line:
                logger.info(line)
    else:
        wanted = "no" if precision == "fp32" else precision
        flagged = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else None
        if flagged and flagged != wanted:
            raise UsageError(f"--precision {precision} contradicts --{flagged}; keep one of them")
        chosen = wanted
    training_args.xla_autocast_bf16 = Backend.of(training_args).xla and chosen == "bf16"
    if training_args.xla_autocast_bf16:
        training_args.mixed_precision, training_args.bf16, training_args.fp16 = "no", False, False
        logger.info("Precision: bf16 autocast on XLA, weights and optimizer state in fp32 (not XLA_USE_BF16)")
        return chosen
    training_args.mixed_precision = chosen
    training_args.bf16, training_args.fp16 = chosen == "bf16", chosen == "fp16"
    if getattr(training_args, "deepspeed_plugin", None) is not None:
        sync_deepspeed_precision(training_args)
    return chosen


def sync_deepspeed_precision(training_args) -> None:
    """Rebuild the DeepSpeed config when the precision changed after TrainingArguments built it.

    TrainingArguments fills DeepSpeed's fp16/bf16 sections in its __post_init__, from the
    --bf16/--fp16 flags or the launcher's mixed precision, before --precision is applied:
    `--precision fp32` under a bf16 accelerate config would otherwise still train in bf16
    (and `auto` could leave the Trainer and the engine disagreeing).
    """
    config = training_args.deepspeed_plugin.deepspeed_config
    enabled = {dtype: str(config.get(dtype, {}).get("enabled", False)).lower() == "true" for dtype in ("fp16", "bf16")}
    if enabled == {"fp16": training_args.fp16, "bf16": training_args.bf16}:
        return
    from accelerate.utils import DeepSpeedPlugin

    if training_args.deepspeed:  # a --deepspeed config file: its "auto" values are filled from the arguments
        from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

        training_args.hf_deepspeed_config = HfTrainerDeepSpeedConfig(training_args.deepspeed)
        training_args.hf_deepspeed_config.trainer_config_process(training_args)
        plugin = DeepSpeedPlugin(hf_ds_config=training_args.hf_deepspeed_config)
    else:  # accelerate's DeepSpeed config, passed in the environment
        plugin = DeepSpeedPlugin()
        plugin.set_mixed_precision(training_args.mixed_precision)
        plugin.set_deepspeed_weakref()
    training_args.deepspeed_plugin = plugin
    logger.info("DeepSpeed: mixed precision %s (its config rebuilt for --precision)", training_args.mixed_precision)
