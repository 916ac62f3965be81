"""Several processes: one process group on CPU too, preprocessing waits that do not time out,
work done once and shared, and checks that the processes really train one model together.

`processes()` answers "how many processes, and which one is this" for every backend, and
says how they talk: a torch.distributed group (gloo on CPU, NCCL on GPUs), or XLA's own
collectives (TPU), where accelerate never creates a torch.distributed group. Every wait and
broadcast here goes through the one the processes have.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

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


def fit_cpu_threads(training_args) -> str | None:
    """Give each CPU process its share of the machine's CPUs; returns a line to log when that changed anything.

    accelerate sets threads per process from the physical cores psutil reports, which in a
    container or a VM limited to fewer CPUs counts the host's: 2 processes on 2 usable CPUs
    got 2 threads each, oversubscribed. Here the share is the CPUs this process may run on
    (its affinity) divided by the processes on this machine. A smaller number chosen by the
    user (OMP_NUM_THREADS) is kept.
    """
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local <= 1 or not Backend.of(training_args).cpu:
        return None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, usable // local)
    current = torch.get_num_threads()
    if current <= share:
        return None
    torch.set_num_threads(share)
    return (f"{share} thread{'s' if share > 1 else ''} per process ({usable} usable CPUs / {local} processes on "
            f"this machine; the launcher gave {current}, which oversubscribes the CPUs)")


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
    """A gloo group of all processes for the stop vote (utils.training.GracefulStop); None unless "torch".

    Its own group, with the training's ddp_timeout: gloo runs beside NCCL, so reading the
    vote never waits on a GPU, and it never queues behind the preprocessing waits of
    `_group()`. XLA agrees on a stop its own way (`utils.xla.PreemptionVote`).
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


def share_tokenizer(training_args, make_tokenizer, cache_root: Path):
    """A tokenizer made by `make_tokenizer()` on rank 0, the same one on every process.

    Every process, rank 0 included, loads it from a directory named after its content:
    `datasets` hashes the tokenizer (its path included) into the tokenization cache key,
    so the same path everywhere lets the other processes, and reruns, hit that cache.
    """
    from transformers import AutoTokenizer

    def files_of_new_tokenizer():
        with tempfile.TemporaryDirectory() as tmp:
            make_tokenizer().save_pretrained(tmp)
            return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}

    files = compute_once(training_args, files_of_new_tokenizer, desc="training the tokenizer")
    digest = hashlib.sha256(b"".join(name.encode() + content for name, content in files.items())).hexdigest()
    directory = cache_root / "tokenizers" / f"shared-{digest[:16]}"
    if not (directory / "tokenizer.json").exists():
        tmp = directory.with_name(f"{directory.name}.tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            (tmp / name).write_bytes(content)
        try:
            os.replace(tmp, directory)
        except OSError:  # another process on this machine wrote the same files first
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(directory)


def report_cache_reuse(datasets, started: float, training_args) -> None:
    """On a non-main process, say whether the tokenized data came from the main process's cache.

    A cache file written after this process started its maps means it tokenized again
    (for instance because the cache is not on a filesystem the processes share).
    """
    who = processes(training_args)
    if who.world <= 1 or who.local_rank == 0:
        return
    files = [f["filename"] for split in datasets.values() for f in split.cache_files]
    if not files:
        return
    rewritten = [f for f in files if os.path.getmtime(f) >= started]
    if rewritten:
        logger.warning("Process %d tokenized the data again instead of reading the main process's cache (%d of "
                       "%d files rewritten)", who.rank, len(rewritten), len(files))
    else:
        process_logger.info("Process %d read the tokenized data from the main process's cache (%d files)",
                            who.rank, len(files))


def parameter_checksum(model) -> str:
    """A short hash of every parameter's bytes: equal on all ranks when replicas are in sync."""
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def tokenizer_checksum(tokenizer) -> str:
    """A short hash of the vocabulary: equal on all ranks when they read text the same way."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(repr(vocab).encode()).hexdigest()[:16]



def log_replica_checksums(trainer, tokenizer) -> None:
    """One line per process with checksums of the data it trained on (different on each) and of its parameters
    and vocabulary (DDP: all equal)."""
    state = trainer.accelerator.state
    if state.num_processes <= 1 or state.distributed_type.name in ("FSDP", "DEEPSPEED"):
        return  # sharded parameters have no whole-model checksum on one rank
    data = getattr(trainer, "data_checksum", None)
    process_logger.info(
        "Process %d of %d after training: data checksum %s (its own batches: differs between processes), "
        "parameter checksum %s, tokenizer checksum %s (equal on all)",
        state.process_index, state.num_processes, "none" if data is None else f"{int(data) % 2**64:016x}",
        parameter_checksum(trainer.model), tokenizer_checksum(tokenizer),
    )


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
    from utils.modeling import tied_parameter_names

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
