"""Several processes: one process group on CPU too, preprocessing waits that do not time out, work done once and
shared, and FSDP2 sharding that keeps tied parameters in one unit.

`processes()` answers "how many processes, and which one is this" for every backend, and
says how they talk: a torch.distributed group (gloo on CPU, NCCL on GPUs), or XLA's own
collectives (TPU), where accelerate never creates a torch.distributed group. Every wait and
broadcast here goes through the one the processes have.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from dataclasses import dataclass
from datetime import timedelta

import torch

from utils.backend import Backend
from utils.errors import UsageError, let_collectives_settle

logger = logging.getLogger(__name__)
# Per-process lines (rank, checksums) go to this logger, which logs on every rank.
process_logger = logging.getLogger("run_mlm.process")

# Ranks waiting for the main process to tokenize wait on this group. Tokenizing a large
# corpus can take hours; the training group's ddp_timeout (30 min by default) must not
# kill the waiting ranks (accelerate#2528).
PREPROCESSING_TIMEOUT = timedelta(hours=24)

_wait_group = None


def launched_world_size() -> int:
    """How many processes the launcher (torchrun / accelerate launch) started."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class Processes:
    """Who this process is among the ones training together, and how they reach each other."""

    rank: int  # global index, 0 = the main process
    local_rank: int  # index on this machine, 0 = its first process
    world: int  # how many train together (TPU: one per chip, or per core on v2/v3)
    # "single": one process, nothing to wait for; "torch": a torch.distributed group (gloo,
    # NCCL); "xla": XLA's collectives (xm.rendezvous), no torch.distributed group exists.
    backend: str


def processes(training_args) -> Processes:
    """The process layout of this run, the same answer for every backend (CPU, GPU, TPU).

    On a single XLA device accelerate reports local_process_index -1 (transformers'
    should_log then silences the only process there is); it counts as the first here.
    """
    world = training_args.world_size
    backend = "single" if world <= 1 else "xla" if Backend.of(training_args).xla else "torch"
    return Processes(training_args.process_index, max(training_args.local_process_index, 0), world, backend)


def _has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def join_cpu_process_group() -> None:
    """On a machine without GPUs, make the processes the launcher started one gloo process group.

    Call before TrainingArguments is built. accelerate forms the group on CPU only when
    ACCELERATE_USE_CPU is set, and `accelerate launch` does not pass a config's
    `use_cpu: true` on to the processes: each would train a model of its own, side by side.
    """
    if launched_world_size() > 1 and "ACCELERATE_USE_CPU" not in os.environ and not _has_accelerator():
        os.environ["ACCELERATE_USE_CPU"] = "1"


def leave_process_group() -> None:
    """Destroy the process group at the end of a finished or cleanly stopped run (a no-op without one).

    Left to interpreter shutdown, gloo's worker threads are torn down after Python, and a
    process that finished its work could abort there ("terminate called without an active
    exception", exit -6: seen once in CI on a resumed 2-process run). Only where every
    process has reached the same point (finished, or stopped after the same step): a process
    that failed must not wait on the others (torch's shutdown guidance).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        let_collectives_settle()
        torch.distributed.destroy_process_group()


def check_process_group(training_args) -> None:
    """Refuse to run when the launched processes did not form one training (they would train apart), or when
    one process would drive several GPUs (the Trainer's nn.DataParallel)."""
    launched = launched_world_size()
    if launched > 1 and training_args.world_size != launched:
        raise UsageError(
            f"the launcher started {launched} processes, but they did not join one process group "
            f"(world size {training_args.world_size}): each would train its own model. On a machine "
            "without GPUs, set ACCELERATE_USE_CPU=1 or use accelerate_configs/multi_cpu.yaml"
        )
    if training_args.n_gpu > 1:
        # The Trainer would wrap the model in nn.DataParallel: one process driving every GPU
        # through replicas of the model, which the MLM head's modules are not made for, and
        # slower than one process per GPU (DDP) in any case.
        raise UsageError(
            f"this one process sees {training_args.n_gpu} GPUs; launch one process per GPU with `accelerate launch "
            "--config_file accelerate_configs/multi_gpu.yaml run_mlm.py ...`, or pick one GPU with "
            "CUDA_VISIBLE_DEVICES=0"
        )


def _group():
    global _wait_group
    if _wait_group is None:
        import torch.distributed as dist

        _wait_group = dist.new_group(backend="gloo", timeout=PREPROCESSING_TIMEOUT)
    return _wait_group


def vote_group(training_args):
    """A gloo group of all processes for the stop vote (utils.train.signals.GracefulStop); None unless "torch".

    Its own group, with the training's ddp_timeout: gloo runs beside NCCL, so reading the
    vote never waits on a GPU, and it never queues behind the preprocessing waits of
    `_group()`. XLA agrees on a stop its own way (`utils.train.xla.PreemptionVote`).
    """
    import torch.distributed as dist

    if processes(training_args).backend != "torch" or not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=training_args.ddp_timeout))


def _wait_for_all(who: Processes, desc: str) -> None:
    """Every process waits here until all have arrived (the caller checked there are several)."""
    if who.backend == "xla":
        import torch_xla.core.xla_model as xm

        # XLA's rendezvous, as accelerate's wait_for_everyone on TPU; one graph sync.
        xm.rendezvous(f"run_mlm: {desc}")
    else:
        import torch.distributed as dist

        dist.barrier(group=_group())


@contextlib.contextmanager
def main_process_first(training_args, desc: str = "work"):
    """The local main process runs the block first; the others run it after (reading its caches).

    Like TrainingArguments.main_process_first, but with torch.distributed the others wait on
    a gloo group with a 24-hour timeout instead of the training group's ddp_timeout; on XLA
    they wait in XLA's rendezvous.
    """
    who = processes(training_args)
    if who.world <= 1:
        yield
        return
    is_main = who.local_rank == 0
    if not is_main:
        logger.info("Waiting for the main process: %s", desc)
        _wait_for_all(who, desc)
    try:
        yield
    finally:
        if is_main:
            _wait_for_all(who, desc)


def compute_once(training_args, compute, desc: str = "work"):
    """`compute()` on global rank 0 only; every process gets its result (any picklable object).

    For results that must be identical everywhere even without a shared filesystem, and
    that are not reproducible when computed twice (a trained tokenizer).
    """
    who = processes(training_args)
    if who.world <= 1:
        return compute()
    result = compute() if who.rank == 0 else None
    if who.rank != 0:
        logger.info("Waiting for rank 0: %s", desc)
    if who.backend == "xla":
        import torch_xla.core.xla_model as xm

        # Every replica sends a payload (empty but for rank 0's) and receives all of them.
        payloads = xm.rendezvous(f"run_mlm: {desc}", pickle.dumps(result) if who.rank == 0 else b"")
        return pickle.loads(payloads[0])
    import torch.distributed as dist

    box = [result]
    dist.broadcast_object_list(box, src=0, group=_group())
    return box[0]


def shard_for_fsdp2(trainer) -> str | None:
    """Under FSDP2, shard the model before accelerate does: a unit per transformer layer, the root holds the rest.

    accelerate's own plan (1.15) gives the embeddings a unit of their own (BERT and RoBERTa
    list them in `_no_split_modules`) and the output projection another, so the tied
    vocabulary matrix, and BERT's decoder bias with its alias `cls.predictions.bias`,
    would belong to two units: torch refuses that (at wrapping, or at the first forward).
    Here every parameter shared between modules stays in the root unit, with the
    embeddings and the MLM head, and each layer without a shared parameter is a unit.
    accelerate leaves a model that is already sharded as it is. The config's
    `fsdp_transformer_layer_cls_to_wrap`, resharding, mixed precision and offload settings
    apply. Returns a line for the log; None when FSDP2 is not in use.
    """
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is None or plugin.fsdp_version != 2:
        return None
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    model = trainer.model
    if isinstance(model, FSDPModule):
        return None
    from utils.model.modeling import tied_parameter_names

    shared = {id(model.get_parameter(name)) for name in tied_parameter_names(model)}
    classes = set(plugin.transformer_cls_names_to_wrap or getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if m is not model and type(m).__name__ in classes
              and not any(id(p) in shared for p in m.parameters())]
    mesh = init_device_mesh(trainer.accelerator.device.type, (trainer.accelerator.num_processes,))
    settings = {"mesh": mesh, "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy()}
    if plugin.cpu_offload is not None:
        settings["offload_policy"] = plugin.cpu_offload
    kinds = sorted({type(layer).__name__ for layer in layers})
    # accelerate resolves its wrap policy's class names on the model it prepares: do it while
    # the classes still have their names (fully_shard renames them FSDP<name>).
    plugin.set_auto_wrap_policy(model)
    for layer in layers:
        fully_shard(layer, reshard_after_forward=plugin.reshard_after_forward, **settings)
    fully_shard(model, **settings)  # the root: torch's default keeps its parameters gathered between passes
    return (f"FSDP2: {len(layers)} {'/'.join(kinds) or 'layer'} units and the root (embeddings, MLM head, tied "
            f"weights), over {trainer.accelerator.num_processes} processes")
