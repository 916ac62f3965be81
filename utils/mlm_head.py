"""The MLM head and loss: predict only the masked positions ("sparse prediction").

Only ~15% of positions carry a label, yet transformers' MLM models project every position
onto the vocabulary; for a 6-layer, 384-wide BERT with a 30522-token vocabulary that dense
head is more than half of the training FLOPs. Here the encoder's hidden states at masked
positions alone go through the head and the loss. The loss is the same number (a test
compares it with the dense head's), the modules and weights are untouched, so checkpoints
stay ordinary transformers checkpoints.

The loss is summed over masked tokens and divided by `num_items_in_batch`, the Trainer's
count of masked tokens in the whole global batch, so that it is their exact mean on 1 or
N processes and with gradient accumulation (see `utils.loss`).
"""

from __future__ import annotations

import functools
import logging

import torch
from transformers.modeling_outputs import MaskedLMOutput

from utils.loss import masked_lm_loss

logger = logging.getLogger(__name__)


def _bert_like(base: str, head: str):
    def parts(model):
        return getattr(model, base), getattr(model, head)
    return parts


def _distilbert(model):
    def head(hidden):
        hidden = model.activation(model.vocab_transform(hidden))
        return model.vocab_projector(model.vocab_layer_norm(hidden))
    return model.distilbert, head


def _electra(model):
    return model.electra, lambda hidden: model.generator_lm_head(model.generator_predictions(hidden))


# MLM class name -> (encoder, head) of a model; the head maps hidden states to logits.
FAMILIES = {
    "BertForMaskedLM": _bert_like("bert", "cls"),
    "RobertaForMaskedLM": _bert_like("roberta", "lm_head"),
    "XLMRobertaForMaskedLM": _bert_like("roberta", "lm_head"),
    "XLMRobertaXLForMaskedLM": _bert_like("roberta", "lm_head"),
    "CamembertForMaskedLM": _bert_like("roberta", "lm_head"),
    "RobertaPreLayerNormForMaskedLM": _bert_like("roberta_prelayernorm", "lm_head"),
    "Data2VecTextForMaskedLM": _bert_like("data2vec_text", "lm_head"),
    "AlbertForMaskedLM": _bert_like("albert", "predictions"),
    "ElectraForMaskedLM": _electra,
    "DistilBertForMaskedLM": _distilbert,
}
# Models whose own forward predicts masked positions only, given `sparse_prediction`.
NATIVE_SPARSE = {"ModernBertForMaskedLM"}

_ENCODER_INPUTS = ("token_type_ids", "position_ids", "inputs_embeds")


def _with_our_loss(original):
    """The model's own forward, with our loss: summed over labelled tokens / num_items_in_batch."""

    @functools.wraps(original)  # the Trainer keeps dataset columns named in forward's signature
    def forward(*args, labels=None, num_items_in_batch=None, **kwargs):
        outputs = original(*args, **kwargs)
        if labels is not None:
            outputs["loss"] = masked_lm_loss(outputs["logits"], labels, num_items_in_batch)
        return outputs

    return forward


def _sparse(original, encoder, head):
    """Encoder on all positions, head and loss on the labelled ones; logits are (masked tokens, vocab)."""
    dense = _with_our_loss(original)

    @functools.wraps(original)
    def forward(input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None or labels.device.type == "xla":
            return dense(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                         num_items_in_batch=num_items_in_batch, **kwargs)
        inputs = {k: v for k, v in kwargs.items() if k in _ENCODER_INPUTS}
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask, **inputs)[0]
        selected = labels != -100
        logits = head(hidden[selected])
        loss = masked_lm_loss(logits, labels[selected], num_items_in_batch, all_labelled=True)
        return MaskedLMOutput(loss=loss, logits=logits)

    return forward


def install_mlm_head(model, sparse: bool = True) -> str:
    """Give `model` the sparse (or dense) MLM forward; returns "sparse", "native sparse" or "dense".

    The forward of a model given labels returns our loss and, when sparse, logits for the
    masked positions only. Without labels (fill-mask, pipelines) it is the model's own.
    """
    name = type(model).__name__
    # The Trainer then passes num_items_in_batch and scales for the number of processes.
    model.accepts_loss_kwargs = True
    if sparse and name in NATIVE_SPARSE:
        # Native path: selects labelled positions and divides by num_items_in_batch itself.
        model.sparse_prediction = True
        model.sparse_pred_ignore_index = -100
        return "native sparse"
    if sparse and name in FAMILIES:
        encoder, head = FAMILIES[name](model)
        model.forward = _sparse(model.forward, encoder, head)
        return "sparse"
    if sparse:
        logger.info("Sparse prediction is not available for %s: the MLM head runs on every position", name)
    model.forward = _with_our_loss(model.forward)
    return "dense"


def predictions_at_labels(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Predicted ids shaped like `labels` (-100 where unlabelled), from dense or sparse logits."""
    if isinstance(logits, tuple):  # some models return extra outputs
        logits = logits[0]
    predicted = logits.argmax(dim=-1)
    if predicted.shape == labels.shape:
        return predicted
    full = torch.full_like(labels, -100)
    full[labels != -100] = predicted.to(labels.dtype)
    return full
