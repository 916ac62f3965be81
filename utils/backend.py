"""What differs between the backends a run trains on (CPU, CUDA GPU, XLA/TPU), said in one place.

Everything else is the same code on every device: the data, the masks (drawn on the CPU
from (seed, step, row), so the same tokens are masked on every backend), the model and its
MLM head, the loss, the Trainer. The differences, decided here from the device the Trainer
picked and applied by the module named:

- `--precision auto` (utils.train.precision): on a CPU, bf16 where its bf16 matmuls outrun fp32 at
  the model's shapes (timed once per machine); on a GPU, bf16 where it has bf16 units; on
  XLA, bf16 autocast on a TPU with weights in fp32.
- Kernels: on a CPU, cheaper dropout, matmul attention, one tied gradient and malloc keeping
  freed memory (utils.model.cpu), but not for a sharded model; on CUDA, FlashAttention-2 for padded
  rows in half precision where it is installed (utils.model.modeling); on XLA, transformers' own.
- Shapes (utils.train.xla, utils.data.masking): static on XLA (padded rows, a fixed number of
  prediction slots per block, whole evaluation batches), so that the graph compiles once;
  elsewhere as each batch comes.
- Threads (utils.train.distributed): on a CPU, each process gets its share of the usable CPUs.
- Data loader: no pinned memory on a CPU (it only warns there).
- Stop on SIGTERM/SIGINT (utils.train.signals.GracefulStop): a vote on a gloo group; on XLA,
  torch_xla's preemption vote.
- nan/inf guard: every step, except on XLA, where reading the gradients would cut the graph
  (compilations are counted instead).
- Replicas (utils.train.xla.start_replicas_equal): on XLA they start from replica 0's weights.

Inside kernels the tensors say where they are (`x.device.type`): a CPU kernel hands a tensor
on another device to torch's own operation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def sharding(training_args) -> str | None:
    """"FSDP" or "DeepSpeed" when the model will be sharded across processes (known before the Trainer
    exists: the --fsdp/--deepspeed flags, or the environment `accelerate launch` sets from its config)."""
    if getattr(training_args, "deepspeed_plugin", None) is not None:
        return "DeepSpeed"
    if getattr(training_args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        return "FSDP"
    return None


@dataclass(frozen=True)
class Backend:
    """The backend of one process: its device type ("cpu", "cuda", "xla", "mps"...) and whether the model is
    sharded ("FSDP", "DeepSpeed" or None)."""

    device: str
    sharded: str | None = None

    @classmethod
    def of(cls, training_args) -> Backend:
        return cls(training_args.device.type, sharding(training_args))

    @property
    def xla(self) -> bool:
        """XLA (TPU, or torch_xla's CPU backend): static shapes, XLA's own vote, replicas start equal."""
        return self.device == "xla"

    @property
    def cpu(self) -> bool:
        return self.device == "cpu"

    @property
    def cpu_kernels(self) -> bool:
        """Whether the CPU speed-ups apply: not to a sharded model, whose layers hold shards they do not expect."""
        return self.cpu and self.sharded is None

    @property
    def times_precision(self) -> bool:
        """Whether --precision auto times bf16 against fp32 (CPUs: bf16 units do not mean bf16 is faster)."""
        return self.cpu

    @property
    def pins_memory(self) -> bool:
        """Pinned host memory speeds copies to an accelerator; on a CPU it only warns."""
        return not self.cpu

    @property
    def flash_attention(self) -> bool:
        """Whether FlashAttention-2 can be chosen (CUDA, half precision, installed: utils.model.modeling)."""
        return self.device == "cuda"
