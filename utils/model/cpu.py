"""Faster training on CPUs, in one call: cheaper dropout, attention that suits the CPU kernels, one tied gradient,
reused memory. Each is a module of its own, with what it was measured to save:

- utils.model.cpu_dropout: dropout masks four per random number (a quarter of each step was `bernoulli_`);
- utils.model.cpu_attention: matmul-softmax-matmul attention while training (SDPA's unfused math path with dropout);
- utils.model.tied_gradient: the tied embedding's gradient rows added into the MLM head's (no dense sum);
- utils.train.cpu_process: glibc's malloc keeps freed memory (no page faults on every step's tensors).

Nothing here changes what is computed in distribution: dropout rates, attention masks
and the model's weights stay as configured. GPUs and evaluation keep transformers' paths.
"""

from __future__ import annotations

from torch import nn

from utils.model.cpu_attention import ATTENTION_NAME, cpu_attention
from utils.model.cpu_dropout import FastDropout
from utils.model.tied_gradient import share_tied_gradient
from utils.train.cpu_process import reuse_freed_memory


def speed_up_for_cpu(model, reuse_memory: bool = True, dropout: bool = True, attention: bool = True,
                     tied_gradient: bool = True) -> list[str]:
    """Swap in the faster dropout and attention, share the tied gradient, keep freed memory; returns what changed.

    Each lever can be left out (the benchmark measures them one by one on each CPU class).
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

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
        # transformers builds no mask at all for an attention name it has no mask function for:
        # padding and sliding windows (ModernBERT's local layers) would silently be ignored.
        # SDPA's boolean masks suit both paths (None where nothing is masked: no pass at all).
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
        model.set_attn_implementation(ATTENTION_NAME)
        changes.append("attention runs as matmul-softmax-matmul while training (SDPA otherwise)")
    if tied_gradient and share_tied_gradient(model):
        changes.append("the tied embedding's gradient rows are added into the MLM head's (no dense sum)")
    return changes
