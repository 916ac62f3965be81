"""Faster training on CPUs: cheaper dropout masks, attention that suits the CPU kernels, reused memory.

Measured on a 2-core Xeon (AMX), BERT 6x384, batch 16 x 128 tokens, bf16 autocast:
- `bernoulli_`, which torch's dropout draws its masks with, took a quarter of each step.
  One 64-bit random draw gives four 16-bit uniform numbers; comparing them with a
  threshold gives the same Bernoulli mask (probability exact to 1/65536) for 1/5 of
  the time. The 64-bit words come from numpy's SFC64 generator, 2.5x faster than
  torch's CPU generator (Mersenne Twister), seeded from torch's generator at every
  call, so `torch.manual_seed` and the Trainer's saved RNG state still decide them.
- With dropout on, SDPA runs its unfused math path (50 ms per layer, forward and
  backward); without dropout, its fused CPU kernel has a slow bf16 backward (55 ms).
  Plain matmul-softmax-matmul attention takes 9 ms, plus the mask.
- glibc's malloc serves large blocks with fresh pages from the kernel and hands them back
  when they are freed, so each step page-faulted its activations and gradients in again:
  27,000 faults and 50 ms of kernel time per step. Zeroing a new 47 MB embedding gradient
  took 12 ms, against 1.2 ms for memory already mapped. Keeping freed memory for reuse
  (what jemalloc or tcmalloc preloaded with LD_PRELOAD do, the usual advice for PyTorch
  on CPU) cut that to 4,500-6,500 faults and 8-12 ms.
Nothing here changes what is computed in distribution: dropout rates, attention masks
and the model's weights stay as configured. GPUs and evaluation keep transformers' paths.
"""

from __future__ import annotations

import ctypes
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_NAME = "run_mlm_cpu"
_INT16_SPAN = 1 << 16


def random_words(n: int) -> torch.Tensor:
    """`n` uniform 64-bit integers (int64), reproducible from torch's global generator."""
    seed = int(torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64))
    return torch.from_numpy(np.random.SFC64(seed).random_raw(n).view(np.int64))


def keep_mask(shape, p: float) -> torch.Tensor:
    """A boolean CPU tensor of `shape`, True with probability 1 - p (to 1/65536): what dropout keeps."""
    numel = 1
    for size in shape:
        numel *= size
    lanes = random_words(-(-numel // 4)).view(torch.int16)[:numel]  # four 16-bit lanes per word
    threshold = round(p * _INT16_SPAN) - _INT16_SPAN // 2  # int16 lanes are uniform on [-32768, 32767]
    return (lanes >= threshold).view(shape)


def fast_dropout(x: torch.Tensor, p: float, training: bool = True, scale: bool = True) -> torch.Tensor:
    """F.dropout with cheaper masks on CPU; F.dropout itself elsewhere.

    scale=False leaves out the 1 / (1 - p) factor, for a caller that applies it to a
    smaller tensor later (the attention output rather than the probabilities).
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        # Under torch.compile, inductor draws dropout masks with its own fast generator.
        dropped = F.dropout(x, p, training=True)
        return dropped if scale else dropped * (1.0 - p)
    # Multiplying by the 0/1 mask measured faster than masked_fill here, forward and backward.
    dropped = x * keep_mask(x.shape, p).to(x.dtype)
    return dropped * (1.0 / (1.0 - p)) if scale else dropped


class FastDropout(nn.Dropout):
    """nn.Dropout (same p, same state dict: none) whose CPU masks cost a fifth."""

    def forward(self, x):
        return fast_dropout(x, self.p, self.training)


def cpu_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Attention for transformers' AttentionInterface, fast on CPU during training; SDPA otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    unsupported = kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None
    fused_wins = query.dtype == torch.float32 and dropout == 0.0  # SDPA's fused fp32 kernel is fastest then
    if not module.training or query.device.type != "cpu" or unsupported or fused_wins:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return matmul_attention(query, key, value, attention_mask, dropout, scaling), None


def matmul_attention(query, key, value, attention_mask, dropout: float = 0.0, scaling=None) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) v, with dropout on the probabilities; output as (batch, seq, heads, dim)."""
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    # Scaling the queries costs a quarter of scaling the scores (head dim 32 vs sequence 128).
    scores = torch.matmul(query * scaling, key.transpose(-1, -2))
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    # Autocast would run softmax in fp32 and cast back for the next matmul: two copies of
    # batch x heads x seq x seq each way. The CPU softmax accumulates in fp32 on bf16 input
    # anyway, and the scores are already bf16 (the matmul's output), so skip the copies.
    with torch.autocast("cpu", enabled=False):
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        # Dropout's 1 / (1 - p) goes on the output, a quarter of the probabilities' size.
        probs = fast_dropout(probs, dropout, training=True, scale=False)
        output = torch.matmul(probs, value.to(probs.dtype))
        if dropout:
            output = output * (1.0 / (1.0 - dropout))
    return output.transpose(1, 2).contiguous()


# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def reuse_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next training step instead of unmapping it.

    Large blocks come from the heap rather than from their own mmap, and the heap is given
    back to the kernel only when over 1 GiB of it is free at the top. Peak memory is the
    same (a step allocates what the previous one freed); memory freed after the peak stays
    with the process. False where the C library is not glibc (macOS, musl): nothing changes.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        # The symbols already loaded into this process, libc's among them: no library search
        # (find_library would run ldconfig in a subprocess at every start).
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1
               for param, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 256 << 20)))


def speed_up_for_cpu(model, reuse_memory: bool = True, dropout: bool = True, attention: bool = True) -> list[str]:
    """Swap in the faster dropout and attention above and keep freed memory; returns what changed, to log.

    Each lever can be left out (the benchmark measures them one by one on each CPU class).
    """
    from transformers import AttentionInterface

    changes = []
    if reuse_memory and reuse_freed_memory():
        changes.append("malloc keeps freed memory for reuse (no page faults on every step's tensors)")
    replaced = 0
    for module in model.modules():
        for name, child in module.named_children():
            if dropout and type(child) is nn.Dropout:
                fast = FastDropout(child.p)
                fast.train(child.training)  # a new module would start in training mode
                setattr(module, name, fast)
                replaced += 1
    if replaced:
        changes.append(f"{replaced} dropout layers draw masks 4 per random number")
    if attention and getattr(model.config, "_attn_implementation", None) in ("sdpa", "eager"):
        AttentionInterface.register(ATTENTION_NAME, cpu_attention)
        model.set_attn_implementation(ATTENTION_NAME)
        changes.append("attention runs as matmul-softmax-matmul while training (SDPA otherwise)")
    return changes
