"""The CPU speed-ups compute the same thing: dropout masks of the right rate, attention equal to SDPA's."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForMaskedLM, BertConfig, BertForMaskedLM

from utils.model import cpu_attention as kernels
from utils.model.cpu import speed_up_for_cpu
from utils.model.cpu_attention import MATMUL_MAX_KEYS, cpu_attention, matmul_attention
from utils.model.cpu_dropout import FastDropout, fast_dropout, keep_mask
from utils.model.mlm_head import install_mlm_head
from utils.model.tied_gradient import share_tied_gradient

from .test_mlm_head import SMALL, tiny
from .test_mlm_head import batch as mlm_batch


def test_keep_mask_rate_shape_and_unbiased_lanes():
    torch.manual_seed(0)
    mask = keep_mask((64, 33, 129), p=0.1)
    assert mask.shape == (64, 33, 129) and mask.dtype == torch.bool
    assert mask.float().mean().item() == pytest.approx(0.9, abs=0.003)
    # Each of the four 16-bit lanes of a 64-bit draw is uniform (none always kept).
    lanes = keep_mask((400_000,), p=0.3).view(-1, 4).float().mean(0)
    assert torch.allclose(lanes, torch.full((4,), 0.7), atol=0.005)
    assert keep_mask((1000,), p=0.0).all()


def test_keep_mask_follows_torch_seed():
    torch.manual_seed(3)
    first, second = keep_mask((5000,), p=0.5), keep_mask((5000,), p=0.5)
    torch.manual_seed(3)
    assert torch.equal(keep_mask((5000,), p=0.5), first)  # same seed, same masks (resumes reproduce)
    assert not torch.equal(first, second)  # successive calls draw new masks


def test_fast_dropout_keeps_the_expectation_and_is_identity_in_eval():
    torch.manual_seed(0)
    x = torch.ones(200_000)
    dropout = FastDropout(0.2)
    y = dropout(x)
    assert (y == 0).float().mean().item() == pytest.approx(0.2, abs=0.005)
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)  # kept values scaled by 1 / (1 - p)
    assert set(y.unique().tolist()) <= {0.0, 1.25}
    dropout.eval()
    assert torch.equal(dropout(x), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_dropout_is_the_keep_mask_scaled_forward_and_backward(dtype):
    x = torch.randn(8, 3, 50, 70, dtype=dtype).transpose(1, 2).requires_grad_()  # a non-contiguous input too
    torch.manual_seed(3)
    y = fast_dropout(x, 0.3)
    torch.manual_seed(3)
    keep = keep_mask(x.shape, 0.3)  # the same draw
    expected = torch.where(keep, x.detach() / 0.7, 0).to(dtype)
    assert y.dtype == dtype and torch.allclose(y, expected, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    assert torch.allclose(x.grad, torch.where(keep, upstream / 0.7, 0).to(dtype),
                          rtol=1e-2 if dtype == torch.bfloat16 else 1e-6)


def attention_inputs(dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 10, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.zeros(2, 1, 10, 10, dtype=dtype)
    mask[1, :, :, 7:] = torch.finfo(dtype).min  # row 2 pads its last 3 keys
    return q, k, v, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_attention_equals_sdpa_with_padding_mask(dtype):
    """The matmul path itself (which cpu_attention takes when training with dropout, or in bf16) against SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module().train()
    module.is_causal = False
    q, k, v, mask = attention_inputs(dtype)
    ours = matmul_attention(q, k, v, mask, dropout=0.0)
    ours.float().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    reference, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0)
    reference.float().sum().backward()
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(ours.float(), reference.float(), atol=tolerance)
    for ours_grad, t in zip(grads, (q, k, v)):
        assert torch.allclose(ours_grad.float(), t.grad.float(), atol=tolerance)


def test_matmul_attention_with_dropout_equals_attention_with_the_same_mask():
    """With dropout, the result is softmax(...) * keep / (1 - p) @ v for the keep mask torch's seed decides."""
    q, k, v, mask = attention_inputs(torch.float32)
    p = 0.3
    torch.manual_seed(5)
    ours = matmul_attention(q, k, v, mask, dropout=p)
    torch.manual_seed(5)
    keep = keep_mask((2, 4, 10, 10), p)  # the same draw
    probs = torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5 + mask, dim=-1)
    reference = ((probs * keep) @ v / (1 - p)).transpose(1, 2)
    assert 0.6 < keep.float().mean() < 0.8
    assert torch.allclose(ours, reference, atol=1e-6)
    assert not torch.allclose(ours, matmul_attention(q, k, v, mask, dropout=0.0), atol=1e-3)  # dropout did act


def test_cpu_attention_takes_the_path_that_wins():
    """fp32 without dropout goes to SDPA's fused kernel; training with dropout goes to the matmul path."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module().train()
    module.is_causal = False
    q, k, v, mask = attention_inputs(torch.float32)
    sdpa, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0)
    assert torch.equal(cpu_attention(module, q, k, v, mask, dropout=0.0)[0], sdpa)
    torch.manual_seed(1)
    dropped, _ = cpu_attention(module, q, k, v, mask, dropout=0.2)
    torch.manual_seed(1)
    assert torch.equal(dropped, matmul_attention(q, k, v, mask, dropout=0.2))


@pytest.mark.parametrize("keys", [MATMUL_MAX_KEYS, MATMUL_MAX_KEYS + 1])
def test_bf16_without_dropout_leaves_long_sequences_to_sdpa(keys, monkeypatch):
    """The matmul path wins on sequences up to 512 in bf16; SDPA's fused kernel beyond (and it never
    holds the sequence x sequence probabilities)."""
    calls = []
    monkeypatch.setattr(kernels, "matmul_attention", lambda *a, **k: calls.append(1) or matmul_attention(*a, **k))
    module = torch.nn.Module().train()
    module.is_causal = False
    q, k, v = (torch.randn(1, 2, keys, 8, dtype=torch.bfloat16) for _ in range(3))
    short = keys <= MATMUL_MAX_KEYS
    cpu_attention(module, q, k, v, None, dropout=0.0)
    assert len(calls) == short
    cpu_attention(module, q, k, v, None, dropout=0.1)  # with dropout SDPA has only its slow math path
    assert len(calls) == short + 1


def test_model_with_speed_ups_predicts_the_same_and_saves_ordinary_checkpoints(tmp_path):
    torch.manual_seed(0)
    def config():  # one each: the attention choice lives on the config
        return BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64)

    plain = BertForMaskedLM(config()).eval()
    fast = BertForMaskedLM(config()).eval()
    fast.load_state_dict(plain.state_dict())
    changes = speed_up_for_cpu(fast)
    assert len(changes) == 4 and any("attention" in c for c in changes) and any("dropout" in c for c in changes)
    assert any("tied embedding" in c for c in changes)
    assert plain.config._attn_implementation == "sdpa" and fast.config._attn_implementation == "run_mlm_cpu"
    assert not any(m.training for m in fast.modules())  # replaced dropout layers kept eval mode
    ids = torch.randint(5, 50, (3, 12))
    assert torch.allclose(fast(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-6)
    # In training mode the attention path runs (dropout off here to compare exactly).
    for model in (plain, fast):
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    plain.config.attention_probs_dropout_prob = fast.config.attention_probs_dropout_prob = 0.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = plain(input_ids=ids).logits, fast(input_ids=ids).logits
    assert torch.allclose(a.float(), b.float(), atol=0.1)
    fast.save_pretrained(tmp_path)
    assert "run_mlm_cpu" not in (tmp_path / "config.json").read_text()
    assert BertForMaskedLM.from_pretrained(tmp_path).config._attn_implementation in ("sdpa", "eager")


@pytest.mark.parametrize("autocast", [False, True])  # fp32 without dropout: SDPA; bf16: the matmul path
@pytest.mark.parametrize("model_type", sorted(SMALL))
def test_speed_ups_keep_the_models_padding_mask(model_type, autocast):
    """What lies behind the padding changes nothing, in training and evaluation, and outputs equal the model's own.

    The CPU attention is registered under its own name, for which transformers builds no
    mask unless told how: without that, every family attended to its padding.
    """
    ids, mask, labels = mlm_batch()
    plain, fast = tiny(model_type), tiny(model_type)  # tiny() seeds itself: the same weights
    speed_up_for_cpu(fast, reuse_memory=False)
    behind = ids.masked_fill(mask == 0, 7)  # other tokens at the padded positions
    real = mask.bool()
    for training in (True, False):
        for model in (plain, fast):
            model.train(training)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            ours = fast(input_ids=ids, attention_mask=mask).logits[real].float()
            padded_otherwise = fast(input_ids=behind, attention_mask=mask).logits[real].float()
            theirs = plain(input_ids=ids, attention_mask=mask).logits[real].float()
        assert torch.allclose(ours, padded_otherwise, atol=1e-6), training
        assert torch.allclose(ours, theirs, atol=5e-2 if autocast else 1e-5), training
    # And through the sparse head, whose last layer gathers the mask's rows at the labelled positions.
    install_mlm_head(fast)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ours, padded_otherwise, theirs = (model(input_ids=x, attention_mask=mask, labels=labels).loss
                                          for model, x in ((fast, ids), (fast, behind), (plain, ids)))
    assert torch.allclose(ours, padded_otherwise, atol=1e-6)
    assert torch.allclose(ours, theirs, atol=2e-2 if autocast else 1e-5)


@pytest.mark.parametrize("path", ["sdpa", "matmul"])
@pytest.mark.parametrize("model_type", sorted(SMALL))
def test_a_training_step_with_every_speed_up_equals_the_models_own(model_type, path, monkeypatch):
    """Sparse head, last layer on labelled positions, CPU attention, tied gradient, chunked loss: on a
    padded batch, in fp32, the loss and every gradient are the unmodified model's."""
    import transformers.integrations.sdpa_attention as sdpa_module

    calls = []
    if path == "matmul":  # fp32 without dropout would go to SDPA: send it to the matmul path instead
        def matmul_instead(module, q, k, v, mask, dropout=0.0, scaling=None, **kwargs):
            calls.append(1)
            return matmul_attention(q, k, v, mask, dropout, scaling), None
        monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", matmul_instead)
    ids, mask, labels = mlm_batch()
    plain, fast = tiny(model_type), tiny(model_type)  # tiny() seeds itself: the same weights
    install_mlm_head(fast)
    speed_up_for_cpu(fast, reuse_memory=False)
    losses = []
    for model in (plain, fast):
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(loss)
    assert bool(calls) == (path == "matmul")
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    for (name, p), (_, f) in zip(plain.named_parameters(), fast.named_parameters()):
        assert (p.grad is None) == (f.grad is None), name
        if p.grad is not None:
            assert torch.allclose(p.grad, f.grad, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("model_type", sorted(SMALL))
def test_a_bf16_training_step_with_every_speed_up_is_as_close_to_fp32_as_the_models_own(model_type):
    """Under bf16 autocast the speed-ups take their own paths (the matmul attention with its softmax kept
    in the scores' dtype, the head's own casts, the loss's bf16 branch): their loss and gradients must be
    as close to the fp32 step's as the unmodified model's bf16 step is, and the gradients stay fp32."""
    ids, mask, labels = mlm_batch()
    plain, fast, exact = tiny(model_type), tiny(model_type), tiny(model_type)  # the same weights
    install_mlm_head(fast)
    speed_up_for_cpu(fast, reuse_memory=False)
    losses = {}
    for name, model, bf16 in (("plain", plain, True), ("fast", fast, True), ("exact", exact, False)):
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            losses[name] = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        losses[name].backward()
    plain_error, fast_error = 0.0, 0.0
    for (name, p), (_, f), (_, e) in zip(plain.named_parameters(), fast.named_parameters(), exact.named_parameters()):
        assert f.grad.dtype == torch.float32, name
        scale = e.grad.norm()
        if scale < 1e-6:  # analytically zero (the keys' bias): rounding noise only
            continue
        plain_error = max(plain_error, float((p.grad - e.grad).norm() / scale))
        fast_error = max(fast_error, float((f.grad - e.grad).norm() / scale))
    # bf16 itself puts the worst parameter's gradient ~1% off fp32's; the speed-ups may not add to that.
    assert 0 < plain_error < 0.05
    assert fast_error < 1.5 * plain_error, (fast_error, plain_error)
    assert abs(losses["fast"] - losses["exact"]) <= 2 * abs(losses["plain"] - losses["exact"]) + 1e-3


@pytest.mark.parametrize("path", ["sdpa", "matmul"])
def test_speed_ups_keep_modernberts_local_attention_window(path, monkeypatch):
    # A dropout too small to drop anything sends training to the matmul path in fp32, where the
    # window (4 positions here, against a sequence of 32) is compared exactly.
    dropout = 1e-12 if path == "matmul" else 0.0

    def model(window):
        torch.manual_seed(0)
        config = AutoConfig.for_model("modernbert", vocab_size=60, hidden_size=32, num_hidden_layers=3,
                                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                      local_attention=window, global_attn_every_n_layers=3, pad_token_id=0,
                                      bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3,
                                      attention_dropout=dropout)
        return AutoModelForMaskedLM.from_config(config).train()

    plain, fast, wide = model(4), model(4), model(64)
    speed_up_for_cpu(fast, reuse_memory=False)
    calls = []
    monkeypatch.setattr(kernels, "matmul_attention", lambda *a, **k: calls.append(1) or matmul_attention(*a, **k))
    ids = torch.randint(5, 60, (2, 32), generator=torch.Generator().manual_seed(0))
    ours, theirs, unwindowed = (m(input_ids=ids).logits for m in (fast, plain, wide))
    assert len(calls) == (3 if path == "matmul" else 0)  # every layer, the two local ones included
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(theirs, unwindowed, atol=1e-4)  # the window does change the outputs


MALLOC_PROBE = """
import ctypes, sys, torch
sys.path.insert(0, {repo!r})
from utils.train.cpu_process import reuse_freed_memory

class Info(ctypes.Structure):  # struct mallinfo2: arena, ordblks, smblks, hblks, hblkhd, ...
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
MB = 1 << 20

def block_mapped_on_its_own():
    block = torch.ones(16 * MB)  # 64 MB, over glibc's largest automatic mmap threshold (32 MB)
    return libc.mallinfo2().hblkhd >= 64 * MB

before = block_mapped_on_its_own()
assert reuse_freed_memory()
after = block_mapped_on_its_own()
print(before, after, libc.mallinfo2().arena >= 64 * MB)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_reuse_freed_memory_serves_big_blocks_from_the_heap_and_keeps_them():
    """Big tensors come from the heap once reuse is on, and stay there for the next step when freed."""
    probe = MALLOC_PROBE.format(repo=str(Path(__file__).resolve().parent.parent))
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    # By default a 64 MB block is its own mmap (unmapped on free, faulted in again next
    # time); after reuse_freed_memory() it comes from the heap, which keeps it after free.
    assert out == ["True", "False", "True"]


def tiny_tied_bert(**overrides):
    config = BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **overrides)
    return BertForMaskedLM(config)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("sparse", [True, False])
def test_tied_gradient_equals_autograds_sum(sparse, autocast):
    """Same gradients as autograd's two-tensor sum, over two accumulated micro-batches with padding ids."""
    torch.manual_seed(0)
    plain = tiny_tied_bert()
    fast = tiny_tied_bert()
    fast.load_state_dict(plain.state_dict())
    assert share_tied_gradient(fast) and not share_tied_gradient(tiny_tied_bert(tie_word_embeddings=False))
    weight = fast.get_input_embeddings().weight
    assert weight is fast.get_output_embeddings().weight  # still one tied Parameter
    assert fast.state_dict().keys() == plain.state_dict().keys()
    shown = repr(fast)  # the two modules that share the gradient say so
    assert "(word_embeddings): TiedEmbedding(300, 32, padding_idx=0, gradient rows added into" in shown
    assert "(decoder): TiedProjection(in_features=32, out_features=300, bias=True, weight gradient handed" in shown
    accumulated = []  # DDP reduces a gradient when it is accumulated: that must happen once per backward
    weight.register_post_accumulate_grad_hook(lambda p: accumulated.append(p.grad.clone()))
    for model in (plain, fast):
        install_mlm_head(model, sparse=sparse)
        model.train()
        for batch in range(2):
            ids = torch.randint(1, 300, (3, 20), generator=torch.Generator().manual_seed(batch))
            ids[:, -4:] = 0  # padding: its embedding row gets no gradient from the lookup
            labels = torch.full_like(ids, -100)
            labels[:, 1::4] = ids[:, 1::4]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=ids, labels=labels, num_items_in_batch=10).loss
            loss.backward()
    assert len(accumulated) == 2
    tolerance = 2e-2 if autocast else 1e-5
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=tolerance), name
    # The lookup's part alone matters: without it the word embedding gradient would differ.
    lookup_rows = torch.unique(ids[:, :-4])
    assert plain.get_input_embeddings().weight.grad[lookup_rows].abs().sum() > 0


def test_tied_gradient_leaves_evaluation_and_untied_models_alone():
    torch.manual_seed(0)
    model = tiny_tied_bert()
    share_tied_gradient(model)
    model.eval()
    ids = torch.randint(1, 300, (2, 10))
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # no graph: the plain lookup and projection
    assert model.get_input_embeddings().tied.grad is None
    model.train()
    model(input_ids=ids).logits.sum().backward()  # a training graph after evaluation: one gradient, no leftovers
    assert model.get_input_embeddings().weight.grad is not None and model.get_input_embeddings().tied.grad is None
    assert logits.shape == (2, 10, 300)
