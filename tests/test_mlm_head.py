"""Sparse prediction: the MLM head on masked positions only gives the dense head's loss and gradients."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForMaskedLM

from utils.mlm_head import install_mlm_head, predictions_at_labels

VOCAB = 60
SMALL = {
    "bert": {},
    "roberta": {},
    "xlm-roberta": {},
    "camembert": {},
    "distilbert": {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64},
    "albert": {"embedding_size": 16},
    "electra": {"embedding_size": 16},
    "modernbert": {},
}


def tiny(model_type, seed=0):
    torch.manual_seed(seed)
    sizes = SMALL[model_type] or {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                  "intermediate_size": 64}
    if model_type in ("albert", "electra"):
        sizes = {**sizes, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    dropout_off = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "dropout": 0.0,
                   "attention_dropout": 0.0, "embedding_dropout": 0.0, "mlp_dropout": 0.0}
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0,
                                  bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3, **sizes,
                                  **dropout_off)
    return AutoModelForMaskedLM.from_config(config)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (4, 16), generator=g)
    labels = torch.where(torch.rand(4, 16, generator=g) < 0.25, ids, torch.full_like(ids, -100))
    mask = torch.ones_like(ids)
    mask[3, 12:] = 0  # one padded row
    labels[3, 12:] = -100
    return ids, mask, labels


@pytest.mark.parametrize("model_type", sorted(SMALL))
def test_sparse_loss_and_gradients_equal_the_dense_head(model_type):
    ids, mask, labels = batch()
    dense, sparse = tiny(model_type), tiny(model_type)
    assert install_mlm_head(dense, sparse=False) == "dense"
    mode = install_mlm_head(sparse, sparse=True)
    assert mode == ("native sparse" if model_type == "modernbert" else "sparse")

    dense_out = dense(input_ids=ids, attention_mask=mask, labels=labels)
    sparse_out = sparse(input_ids=ids, attention_mask=mask, labels=labels)
    n_masked = int((labels != -100).sum())
    assert dense_out.logits.shape == (4, 16, VOCAB)
    assert sparse_out.logits.shape == (n_masked, VOCAB)  # the head ran on masked positions only
    assert torch.allclose(sparse_out.loss, dense_out.loss, atol=1e-5)
    dense_out.loss.backward()
    sparse_out.loss.backward()
    for (name, d), (_, s) in zip(dense.named_parameters(), sparse.named_parameters()):
        if d.grad is not None:
            assert torch.allclose(d.grad, s.grad, atol=1e-5), name


def test_loss_divides_by_the_global_count_when_given():
    ids, mask, labels = batch()
    model = tiny("bert")
    install_mlm_head(model)
    mean = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    n = (labels != -100).sum()
    summed = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=4 * n).loss
    assert torch.allclose(summed * 4, mean, atol=1e-6)


def test_without_labels_the_model_is_unchanged():
    ids, mask, _ = batch()
    plain, patched = tiny("roberta"), tiny("roberta")
    install_mlm_head(patched)
    assert torch.allclose(plain(input_ids=ids, attention_mask=mask).logits,
                          patched(input_ids=ids, attention_mask=mask).logits)
    assert plain.state_dict().keys() == patched.state_dict().keys()  # checkpoints stay ordinary


def test_unknown_families_fall_back_to_the_dense_head(caplog):
    torch.manual_seed(0)
    config = AutoConfig.for_model("mobilebert", vocab_size=VOCAB, hidden_size=32, embedding_size=16,
                                  num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                  intra_bottleneck_size=16, true_hidden_size=16)
    model = AutoModelForMaskedLM.from_config(config)
    ids, mask, labels = batch()
    reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    with caplog.at_level("INFO", logger="utils.mlm_head"):
        assert install_mlm_head(model) == "dense"
    assert "Sparse prediction is not available for MobileBertForMaskedLM" in caplog.text
    assert torch.allclose(model(input_ids=ids, attention_mask=mask, labels=labels).loss, reference, atol=1e-5)


def test_predictions_are_laid_out_like_the_labels():
    labels = torch.tensor([[-100, 7, -100], [5, -100, -100]])
    sparse_logits = torch.zeros(2, 10)
    sparse_logits[0, 7] = sparse_logits[1, 4] = 1.0
    assert predictions_at_labels(sparse_logits, labels).tolist() == [[-100, 7, -100], [4, -100, -100]]
    dense_logits = torch.zeros(2, 3, 10)
    dense_logits[..., 2] = 1.0
    assert predictions_at_labels((dense_logits,), labels).tolist() == [[2, 2, 2], [2, 2, 2]]


@pytest.mark.parametrize("sparse", [True, False])
def test_forward_keeps_the_models_signature(sparse):
    # The Trainer drops dataset columns that forward's signature does not name.
    import inspect

    model = tiny("bert")
    install_mlm_head(model, sparse=sparse)
    parameters = inspect.signature(model.forward).parameters
    assert {"input_ids", "attention_mask", "token_type_ids", "labels"} <= set(parameters)
