"""The MLM loss: the mean over labelled tokens, whatever the process and accumulation layout."""

import torch
from transformers import BertConfig, BertForMaskedLM

from utils.loss import masked_lm_loss


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
