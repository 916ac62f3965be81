"""Faster training on CPUs: cheaper dropout, attention that suits the CPU kernels, one tied gradient, reused memory.

Measured on a 2-core Xeon (AMX), BERT 6x384, batch 16 x 128 tokens, bf16 autocast:
- `bernoulli_`, which torch's dropout draws its masks with, took a quarter of each step.
  One 64-bit random draw gives four 16-bit uniform numbers; comparing them with a
  threshold gives the same Bernoulli mask (probability exact to 1/65536) for 1/5 of
  the time. The 64-bit words come from numpy's SFC64 generator, 2.5x faster than
  torch's CPU generator (Mersenne Twister), seeded from torch's generator at every
  call, so `torch.manual_seed` and the Trainer's saved RNG state still decide them.
  Applying the mask as one autograd function (the comparison writes the 0/1 mask in
  the input's dtype, addcmul multiplies by it and by 1 / (1 - p) in one pass) halved
  dropout's cost again: 9.1 -> 5.9 ms forward and backward on the attention
  probabilities of one layer (16 x 12 x 128 x 128, fp32), 2.0 -> 1.3 ms on hidden states.
- With dropout on, SDPA runs its unfused math path (50 ms per layer, forward and
  backward); without dropout, its fused CPU kernel has a slow bf16 backward (55 ms).
  Plain matmul-softmax-matmul attention takes 9 ms, plus the mask (at 128 tokens; without
  dropout, beyond 512 the fused kernel is faster, and there it stays: see cpu_attention).
- With tied input and output embeddings (BERT, RoBERTa, ModernBERT...), autograd
  gives the vocabulary matrix two dense gradients, the head's and the embedding
  lookup's (a zeroed 47 MB tensor with 2,048 rows added in), and then adds them into a
  third. Here the lookup's rows are added in place into the head's gradient instead,
  and the sum reaches autograd once: 1.3% faster per step (fp32, no AMX; 4 of 4
  interleaved runs) and one 47 MB tensor less at the peak.
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
MATMUL_MAX_KEYS = 512  # without dropout, longer sequences go to SDPA's fused kernel (see cpu_attention)
_INT16_SPAN = 1 << 16


def random_words(n: int) -> torch.Tensor:
    """`n` uniform 64-bit integers (int64), reproducible from torch's global generator."""
    seed = int(torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64))
    return torch.from_numpy(np.random.SFC64(seed).random_raw(n).view(np.int64))


def _lanes(shape) -> torch.Tensor:
    numel = 1
    for size in shape:
        numel *= size
    return random_words(-(-numel // 4)).view(torch.int16)[:numel].view(shape)  # four 16-bit lanes per word


def _threshold(p: float) -> int:
    return round(p * _INT16_SPAN) - _INT16_SPAN // 2  # int16 lanes are uniform on [-32768, 32767]


def keep_mask(shape, p: float) -> torch.Tensor:
    """A boolean CPU tensor of `shape`, True with probability 1 - p (to 1/65536): what dropout keeps."""
    return _lanes(shape) >= _threshold(p)


class _Dropout(torch.autograd.Function):
    """x * mask * scale with a 0/1 mask of x's dtype: three passes over x-sized memory, forward and backward.

    The comparison writes the mask straight in x's dtype (no bool tensor to convert), and
    addcmul applies mask and scale in one pass. Autograd's x * mask.to(dtype) * scale took
    twice the time: a bool mask, a converted copy, and two multiplications each way.
    """

    @staticmethod
    def forward(ctx, x, p, scale):
        mask = torch.ge(_lanes(x.shape), _threshold(p), out=torch.empty_like(x, memory_format=torch.contiguous_format))
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return torch.addcmul(x.new_zeros(()), x, mask, value=scale)

    @staticmethod
    def backward(ctx, grad_output):
        (mask,) = ctx.saved_tensors
        return torch.addcmul(grad_output.new_zeros(()), grad_output, mask, value=ctx.scale), None, None


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout with cheaper masks on CPU; F.dropout itself elsewhere."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        # Under torch.compile, inductor draws dropout masks with its own fast generator.
        return F.dropout(x, p, training=True)
    return _Dropout.apply(x, p, 1.0 / (1.0 - p))


class FastDropout(nn.Dropout):
    """nn.Dropout (same p, same state dict: none) whose CPU masks cost a fifth."""

    def forward(self, x):
        return fast_dropout(x, self.p, self.training)


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


class TiedGradient:
    """The output projection's weight gradient, held for the tied embedding lookup to add its rows to."""

    def __init__(self):
        self.armed = False  # set by a lookup that will take the gradient in its backward
        self.grad: torch.Tensor | None = None

    def take(self) -> torch.Tensor | None:
        grad, self.grad = self.grad, None
        return grad


class _TiedLookup(torch.autograd.Function):
    """F.embedding whose backward adds its rows into the head's gradient and returns the sum."""

    @staticmethod
    def forward(ctx, weight, ids, padding_idx, tied):
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.tied = padding_idx, tied
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_output):
        (ids,) = ctx.saved_tensors
        grad = ctx.tied.take()
        if grad is None:  # the head did not run on this graph (or was not given this path)
            grad = torch.zeros(ctx.weight_shape, dtype=ctx.weight_dtype, device=grad_output.device)
        rows, updates = ids.reshape(-1), grad_output.reshape(-1, grad_output.shape[-1]).to(grad.dtype)
        if ctx.padding_idx is not None:  # as F.embedding: the padding row gets no gradient
            keep = rows != ctx.padding_idx
            rows, updates = rows[keep], updates[keep]
        return grad.index_add_(0, rows, updates), None, None, None


class _TiedProjection(torch.autograd.Function):
    """F.linear with a detached weight whose gradient goes to the TiedGradient, not to autograd."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tied):
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else hidden.dtype
        with torch.autocast("cpu", enabled=False):
            hidden_c, weight_c = hidden.to(dtype), weight.to(dtype)
            output = F.linear(hidden_c, weight_c, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(hidden_c, weight_c)
        ctx.tied, ctx.weight_dtype, ctx.hidden_dtype = tied, weight.dtype, hidden.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return output

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight = ctx.saved_tensors
        flat_grad = grad_output.reshape(-1, grad_output.shape[-1])
        weight_grad = (flat_grad.t() @ hidden.reshape(-1, hidden.shape[-1])).to(ctx.weight_dtype)
        ctx.tied.grad = weight_grad if ctx.tied.grad is None else ctx.tied.grad.add_(weight_grad)
        grad_hidden = (grad_output @ weight).to(ctx.hidden_dtype)
        grad_bias = flat_grad.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return grad_hidden, None, grad_bias, None


def _fast_path(weight: torch.Tensor) -> bool:
    return (torch.is_grad_enabled() and weight.requires_grad and weight.device.type == "cpu"
            and not torch.compiler.is_compiling())


class TiedEmbedding(nn.Embedding):
    """nn.Embedding (same parameters) that takes the tied head's gradient in its backward."""

    tied: TiedGradient

    @classmethod
    def sharing(cls, lookup: nn.Embedding, tied: TiedGradient) -> TiedEmbedding:
        """A TiedEmbedding holding `lookup`'s own weight Parameter (the tie, the optimizer's and checkpoints' key)."""
        new = cls(lookup.num_embeddings, lookup.embedding_dim, lookup.padding_idx, device="meta")
        new.weight, new.tied = lookup.weight, tied
        return new.train(lookup.training)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", gradient rows added into the tied output projection's"

    def forward(self, ids):
        self.tied.armed = _fast_path(self.weight)
        if not self.tied.armed:
            return super().forward(ids)
        self.tied.grad = None  # a new graph: nothing held from one that never ran backward
        return _TiedLookup.apply(self.weight, ids, self.padding_idx, self.tied)


class TiedProjection(nn.Linear):
    """nn.Linear (same parameters) whose weight gradient joins the tied embedding's without a dense add."""

    tied: TiedGradient

    @classmethod
    def sharing(cls, projection: nn.Linear, tied: TiedGradient) -> TiedProjection:
        """A TiedProjection holding `projection`'s own weight and bias Parameters."""
        new = cls(projection.in_features, projection.out_features, projection.bias is not None, device="meta")
        new.weight, new.bias, new.tied = projection.weight, projection.bias, tied
        return new.train(projection.training)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", weight gradient handed to the tied embedding"

    def forward(self, hidden):
        # Only on a graph whose lookup will take the gradient, so that none is left behind.
        if not (self.tied.armed and _fast_path(self.weight)):
            return super().forward(hidden)
        return _TiedProjection.apply(hidden, self.weight.detach(), self.bias, self.tied)


def share_tied_gradient(model) -> bool:
    """Route the tied vocabulary matrix's two gradients into one tensor; False where it does not apply.

    Applies to an nn.Embedding tied to an nn.Linear output projection (the same
    Parameter), with none of the lookup options that change its gradient. The two modules
    are replaced by a TiedEmbedding and a TiedProjection holding the same Parameters (so the
    state dict and the tie are unchanged; `print(model)` shows them). The weight
    still gets one gradient, at the lookup's backward (the last of the step), so DDP
    and gradient accumulation see an ordinary parameter.
    """
    lookup = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    projection = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if (type(lookup) is not nn.Embedding or type(projection) is not nn.Linear
            or projection.weight is not lookup.weight or lookup.max_norm is not None
            or lookup.scale_grad_by_freq or lookup.sparse):
        return False
    tied = TiedGradient()
    replacements = {lookup: TiedEmbedding.sharing(lookup, tied), projection: TiedProjection.sharing(projection, tied)}
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if child in replacements:
                setattr(module, name, replacements[child])
    return True


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
