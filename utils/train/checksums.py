"""Checks that the processes really train one model together: per-process checksums of data, parameters, vocabulary."""

from __future__ import annotations

import hashlib

import torch

from utils.train.distributed import process_logger


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
