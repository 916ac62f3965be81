"""Sparse prediction: the head and the last layer on masked positions only give the dense head's loss and gradients."""

import contextlib
import json
import pickle
from copy import deepcopy

import pytest
import torch
from transformers import AttentionInterface, AutoConfig, AutoModelForMaskedLM, BertForMaskedLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from utils.model.cpu import speed_up_for_cpu
from utils.model.mlm_head import install_mlm_head, predictions_at_labels

VOCAB = 60
SMALL = {
    "bert": {},
    "roberta": {},
    "xlm-roberta": {},
    "camembert": {},
    "data2vec-text": {},
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

    subset = model_type not in ("albert", "modernbert")  # ALBERT shares one layer; ModernBERT is native
    dense_out = dense(input_ids=ids, attention_mask=mask, labels=labels)
    with last_layer_rows(sparse) if subset else contextlib.nullcontext() as rows:
        sparse_out = sparse(input_ids=ids, attention_mask=mask, labels=labels)
    n_masked = int((labels != -100).sum())
    assert dense_out.logits.shape == (4, 16, VOCAB)
    assert sparse_out.logits.shape == (n_masked, VOCAB)  # the head ran on masked positions only
    if subset:
        assert rows == [most_labelled(labels)]  # so did the last layer
    assert torch.allclose(sparse_out.loss, dense_out.loss, atol=1e-5)
    dense_out.loss.backward()
    sparse_out.loss.backward()
    for (name, d), (_, s) in zip(dense.named_parameters(), sparse.named_parameters()):
        if d.grad is not None:
            assert torch.allclose(d.grad, s.grad, atol=1e-5), name


def last_layer(model):
    base = model.base_model
    return (getattr(base, "encoder", None) or base.transformer).layer[-1]


@contextlib.contextmanager
def last_layer_rows(model):
    """The number of positions per row of each output of the model's last encoder layer."""
    rows = []
    handle = last_layer(model).register_forward_hook(lambda module, args, output: rows.append(output.shape[1]))
    try:
        yield rows
    finally:
        handle.remove()


def most_labelled(labels):
    return int((labels != -100).sum(dim=1).max())


@pytest.mark.parametrize("attention", ["eager", "sdpa", "run_mlm_cpu"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_last_layer_on_labelled_positions_equals_the_full_layer(attention, checkpointing):
    # Training mode (dropout is off in these configs), with a padded row; bf16 autocast takes
    # the CPU attention's matmul path, which fp32 without dropout leaves to SDPA.
    ids, mask, labels = batch()
    full, subset = tiny("bert"), tiny("bert")
    install_mlm_head(full, last_layer=False)
    install_mlm_head(subset)
    for model in (full, subset):
        if attention == "run_mlm_cpu":
            speed_up_for_cpu(model, reuse_memory=False)
        else:
            model.set_attn_implementation(attention)
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=attention == "run_mlm_cpu"):
        full_loss = full(input_ids=ids, attention_mask=mask, labels=labels).loss
        with last_layer_rows(subset) as rows:
            subset_loss = subset(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert rows == [most_labelled(labels)]
    tolerance = 2e-2 if attention == "run_mlm_cpu" else 1e-5
    assert torch.allclose(subset_loss, full_loss, atol=tolerance)
    full_loss.backward()
    subset_loss.backward()
    for (name, f), (_, s) in zip(full.named_parameters(), subset.named_parameters()):
        assert torch.allclose(f.grad, s.grad, atol=tolerance, rtol=tolerance), name


def test_last_layer_applies_attention_dropout_on_labelled_positions():
    ids, mask, labels = batch()
    model = tiny("bert")
    last_layer(model).attention.self.dropout.p = 0.5
    install_mlm_head(model)
    model.eval()
    kept = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    model.train()
    with last_layer_rows(model) as rows:
        dropped = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert rows == [most_labelled(labels)]
    assert not torch.allclose(dropped, kept)


def test_a_batch_without_labels_runs_the_full_last_layer():
    ids, mask, labels = batch()
    model = tiny("bert")
    install_mlm_head(model)
    with last_layer_rows(model) as rows:
        out = model(input_ids=ids, attention_mask=mask, labels=torch.full_like(labels, -100))
    assert rows == [16] and out.logits.shape == (0, VOCAB) and out.loss.item() == 0.0
    out.loss.backward()
    with last_layer_rows(model) as rows:  # and the next batch is subset again
        model(input_ids=ids, attention_mask=mask, labels=labels)
    assert rows == [most_labelled(labels)]


def test_attention_the_last_layer_cannot_subset_keeps_the_full_layer():
    ids, mask, labels = batch()
    model = tiny("bert")
    install_mlm_head(model)
    AttentionInterface.register("test_other", sdpa_attention_forward)
    model.set_attn_implementation("test_other")
    with last_layer_rows(model) as rows:
        model(input_ids=ids, attention_mask=mask, labels=labels)
    assert rows == [16]


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
    with caplog.at_level("INFO", logger="utils.model.mlm_head"):
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


def test_the_head_shows_in_print_and_saves_as_the_familys_own_checkpoint(tmp_path):
    ids, mask, labels = batch()
    model = tiny("bert")
    install_mlm_head(model)
    shown = repr(model)
    assert shown.startswith("SparseBertForMaskedLM(\n  MLM head on masked positions only")
    assert "(1): BertLayerAtMaskedPositions(\n" in shown and "(0): BertLayer(\n" in shown
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert type(reloaded) is BertForMaskedLM
    install_mlm_head(reloaded)
    assert torch.allclose(reloaded(input_ids=ids, attention_mask=mask, labels=labels).loss, loss, atol=1e-6)
    with pytest.raises(ValueError, match="already has its MLM head"):
        install_mlm_head(model)


@pytest.mark.parametrize("model_type", ["bert", "distilbert", "modernbert"])
def test_a_copy_of_the_model_runs_on_its_own_weights(model_type):
    # nn.DataParallel's replicas, deepcopy and pickle copy the modules: the forward of the copy
    # must use the copy's encoder and layers, not the original's.
    ids, mask, labels = batch()
    model = tiny(model_type)
    install_mlm_head(model)
    copy = deepcopy(model)
    before = copy(input_ids=ids, attention_mask=mask, labels=labels).loss
    unpickled = pickle.loads(pickle.dumps(model))  # torch.save(model) pickles it
    assert repr(unpickled) == repr(model)
    assert torch.equal(unpickled(input_ids=ids, attention_mask=mask, labels=labels).loss, before)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    assert torch.equal(copy(input_ids=ids, attention_mask=mask, labels=labels).loss, before)
    assert not torch.allclose(model(input_ids=ids, attention_mask=mask, labels=labels).loss, before)


def test_the_head_and_the_cpu_speed_ups_install_in_either_order():
    ids, mask, labels = batch()
    first, second = tiny("bert"), tiny("bert")
    install_mlm_head(first)
    speed_up_for_cpu(first, reuse_memory=False)
    speed_up_for_cpu(second, reuse_memory=False)
    install_mlm_head(second)
    assert repr(first) == repr(second)
    losses = []
    for model in (first, second):
        with last_layer_rows(model) as rows:
            losses.append(model(input_ids=ids, attention_mask=mask, labels=labels).loss)
        assert rows == [most_labelled(labels)]
        losses[-1].backward()
    assert torch.equal(losses[0], losses[1])
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a.grad, b.grad), name


# --- fixed prediction slots (the XLA head) ---------------------------------------------------------------

SLOTS = 6  # batch() labels at most 5 positions of a row


@pytest.mark.parametrize("model_type", sorted(SMALL))
def test_slot_head_loss_and_gradients_equal_the_dense_head(model_type):
    ids, mask, labels = batch()
    assert most_labelled(labels) <= SLOTS
    dense, slotted = tiny(model_type), tiny(model_type)
    install_mlm_head(dense, sparse=False)
    mode = install_mlm_head(slotted, sparse=True, slots=SLOTS)
    # ModernBERT's own sparse head selects a changing number of rows: dense on XLA.
    assert mode == ("dense" if model_type == "modernbert" else f"sparse, {SLOTS} prediction slots per block")
    subset = model_type not in ("albert", "modernbert")
    dense_out = dense(input_ids=ids, attention_mask=mask, labels=labels)
    with last_layer_rows(slotted) if subset else contextlib.nullcontext() as rows:
        slot_out = slotted(input_ids=ids, attention_mask=mask, labels=labels)
    if model_type != "modernbert":
        assert slot_out.logits.shape == (4, SLOTS, VOCAB)  # the same shape whatever was masked
        assert slot_out.slot_positions.shape == (4, SLOTS)
    if subset:
        assert rows == [SLOTS]  # the last layer ran on the slots too
    assert torch.allclose(slot_out.loss, dense_out.loss, atol=1e-5)
    n = (labels != -100).sum()
    global_loss = slotted(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=2 * n).loss
    assert torch.allclose(global_loss * 2, dense_out.loss, atol=1e-5)
    dense_out.loss.backward()
    slot_out.loss.backward()
    for (name, d), (_, s) in zip(dense.named_parameters(), slotted.named_parameters()):
        if d.grad is not None:
            assert torch.allclose(d.grad, s.grad, atol=1e-5), name


def test_slot_head_with_nothing_labelled_and_predictions_back_at_their_positions():
    ids, mask, labels = batch()
    model = tiny("bert")
    install_mlm_head(model, slots=SLOTS)
    empty = model(input_ids=ids, attention_mask=mask, labels=torch.full_like(labels, -100))
    assert empty.logits.shape == (4, SLOTS, VOCAB) and empty.loss.item() == 0.0
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    dense_logits = tiny("bert")(input_ids=ids, attention_mask=mask).logits  # the same weights, every position
    # What the Trainer hands preprocess_logits_for_metrics: every output but the loss.
    predicted = predictions_at_labels((out.logits, out.slot_positions), labels)
    expected = torch.where(labels != -100, dense_logits.argmax(-1), -100)
    assert torch.equal(predicted, expected)
