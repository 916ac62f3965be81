"""Attention that suits the CPU kernels while training: matmul-softmax-matmul, or SDPA's fused kernel where it wins.

Measured on a 2-core Xeon (AMX), BERT 6x384, batch 16 x 128 tokens, bf16 autocast:
With dropout on, SDPA runs its unfused math path (50 ms per layer, forward and
backward); without dropout, its fused CPU kernel has a slow bf16 backward (55 ms).
Plain matmul-softmax-matmul attention takes 9 ms, plus the mask (at 128 tokens; without
dropout, beyond 512 the fused kernel is faster, and there it stays: see cpu_attention).
"""

from __future__ import annotations

import torch

from utils.model.cpu_dropout import fast_dropout

ATTENTION_NAME = "run_mlm_cpu"
MATMUL_MAX_KEYS = 512  # without dropout, longer sequences go to SDPA's fused kernel (see cpu_attention)


def cpu_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Attention for transformers' AttentionInterface, fast on CPU during training; SDPA otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # Sliding windows (ModernBERT's local layers) are in the mask, as for SDPA; softcapping is not.
    unsupported = kwargs.get("softcap") is not None
    # Without dropout SDPA's fused kernel is fastest in fp32, and in bf16 beyond 512 keys. The
    # matmul path's time against SDPA's (bf16, AMX, head size 64, forward and backward): 0.29x at
    # 128 keys, 0.84x at 512, 1.41x at 768, 1.46-1.67x at 1024-2048 (a local window: 1.04x at 512,
    # 1.83-2.0x at 768-1024). There SDPA also keeps no sequence x sequence probabilities in memory.
    fused_wins = dropout == 0.0 and (query.dtype == torch.float32 or key.size(-2) > MATMUL_MAX_KEYS)
    if not module.training or query.device.type != "cpu" or unsupported or fused_wins:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return matmul_attention(query, key, value, attention_mask, dropout, scaling), None


def matmul_attention(query, key, value, attention_mask, dropout: float = 0.0, scaling=None) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) v, with dropout on the probabilities; output as (batch, seq, heads, dim)."""
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    # Scaling the queries costs a quarter of scaling the scores (head dim 32 vs sequence 128).
    # Queries and keys arrive as strided views of the projections: batched matmuls on
    # contiguous copies are faster than the copies cost (fp32, no AMX: 18.2 vs 19.0 ms per
    # layer forward and backward, 9 of 10 interleaved rounds; bf16 with AMX: the same).
    scores = torch.matmul(query.contiguous() * scaling, key.contiguous().transpose(-1, -2))
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    # Autocast would run softmax in fp32 and cast back for the next matmul: two copies of
    # batch x heads x seq x seq each way. The CPU softmax accumulates in fp32 on bf16 input
    # anyway, and the scores are already bf16 (the matmul's output), so skip the copies.
    with torch.autocast("cpu", enabled=False):
        probs = fast_dropout(torch.softmax(scores, dim=-1).to(value.dtype), dropout)
        output = torch.matmul(probs, value.to(probs.dtype))
    return output.transpose(1, 2).contiguous()
