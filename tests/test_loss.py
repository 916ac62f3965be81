"""The MLM loss: the mean over labelled tokens, whatever the process and accumulation layout."""

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM

from utils.model.loss import masked_lm_loss


def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForMaskedLM(config)


def batch(rows=6, length=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (rows, length), generator=g)
    labels = torch.where(torch.rand(rows, length, generator=g) < 0.3, ids, torch.full_like(ids, -100))
    return ids, labels


def test_without_item_count_it_is_the_models_own_loss():
    model = tiny_bert()
    ids, labels = batch()
    outputs = model(input_ids=ids, labels=labels)
    assert torch.allclose(masked_lm_loss(outputs.logits, labels), outputs.loss, atol=1e-6)


def test_split_batches_sum_to_the_global_token_mean():
    # Two halves with different numbers of labelled tokens (2 processes, or 2 accumulation
    # steps): with the global count, their losses add up to the loss of the whole batch.
    model = tiny_bert()
    ids, labels = batch()
    labels[:3, :] = torch.where(torch.arange(10) < 2, ids[:3, :], -100)  # few labels in the first half
    whole = masked_lm_loss(model(input_ids=ids).logits, labels)
    total = (labels != -100).sum()
    halves = [masked_lm_loss(model(input_ids=ids[s]).logits, labels[s], num_items_in_batch=total)
              for s in (slice(0, 3), slice(3, 6))]
    assert torch.allclose(halves[0] + halves[1], whole, atol=1e-6)
    # A mean of per-half means (what a per-device loss gives) is not the same number.
    per_half = [masked_lm_loss(model(input_ids=ids[s]).logits, labels[s]) for s in (slice(0, 3), slice(3, 6))]
    assert abs((per_half[0] + per_half[1]) / 2 - whole) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [0, 1, 16, 37])  # empty, one, a whole chunk, chunks and a partial one
def test_chunked_cross_entropy_equals_torchs_in_value_and_gradient(dtype, rows):
    from utils.model.loss import ChunkedCrossEntropySum

    torch.manual_seed(rows)
    logits = (torch.randn(rows, 1000) * 3).to(dtype)
    targets = torch.randint(0, 1000, (rows,))
    ours_in, torch_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = ChunkedCrossEntropySum.apply(ours_in, targets)
    expected = F.cross_entropy(torch_in.float(), targets, reduction="sum")
    (ours * 0.5).backward()
    (expected * 0.5).backward()
    assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-4)
    assert ours_in.grad.dtype == dtype
    assert torch.allclose(ours_in.grad.float(), torch_in.grad.float(), atol=1e-6 if dtype == torch.float32 else 4e-3)
