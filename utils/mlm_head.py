"""The MLM head and loss: predict only the masked positions ("sparse prediction").

Only ~15% of positions carry a label, yet transformers' MLM models project every position
onto the vocabulary; for a 6-layer, 384-wide BERT with a 30522-token vocabulary that dense
head is more than half of the training FLOPs. Here the encoder's hidden states at masked
positions alone go through the head and the loss. The loss is the same number (a test
compares it with the dense head's), the modules and weights are untouched, so checkpoints
stay ordinary transformers checkpoints.

The last encoder layer goes further: what it computes at a position feeds only that
position's output, so for the masked positions' outputs it needs keys and values at every
position but queries, attention output, feed-forward and LayerNorms at the masked ones
alone: 10 of its 12 d^2 products per token, and its attention scores, shrink to the masked
positions (padded per row to the row with the most: about a fifth at 15% masking). Same
loss and gradients (tests compare with the dense head for every family it covers).

On XLA (TPU) the number of masked tokens, which changes every batch, must not become a
shape: each change would compile a new graph. There the head works on a fixed number of
slots per block (`slots`, BERT's max_predictions_per_seq): each row's masked positions,
padded with ignored slots, gathered into a (rows, slots) grid; the masking caps a block's
masked tokens at that number (`utils.masking.cap_selection`), so no label is lost.

The loss is summed over masked tokens and divided by `num_items_in_batch`, the Trainer's
count of masked tokens in the whole global batch, so that it is their exact mean on 1 or
N processes and with gradient accumulation (see `utils.loss`).
"""

from __future__ import annotations

import functools
import logging
import sys
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import MaskedLMOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.pytorch_utils import apply_chunking_to_forward

from utils.cpu import ATTENTION_NAME
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


@dataclass
class SlotMaskedLMOutput(MaskedLMOutput):
    """The fixed-slot head's output: `logits` are (rows, slots, vocab), for the positions in `slot_positions`."""

    slot_positions: torch.LongTensor | None = None


def labelled_slots(selected: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, valid), both (rows, slots): each row's labelled positions in increasing order, then
    unlabelled ones (distinct, so a scatter back never collides); `valid` marks the labelled."""
    # A stable sort puts each row's labelled positions first, in increasing order.
    positions = torch.sort((~selected).to(torch.int8), dim=1, stable=True).indices[:, :slots]
    return positions, torch.arange(slots, device=selected.device) < selected.sum(dim=1, keepdim=True)


def _sparse(original, encoder, head, last_layer=None, slots: int | None = None):
    """Encoder on all positions, head and loss on the labelled ones; logits are (masked tokens, vocab).

    With `last_layer` (a `LabelledPositions`), the encoder's last layer runs its queries
    on the labelled positions only and returns their states. With `slots` (on XLA), every
    row has that many prediction slots: the same shapes whatever was masked.
    """
    dense = _with_our_loss(original)

    @functools.wraps(original)
    def forward(input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None or (labels.device.type == "xla" and slots is None):
            return dense(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                         num_items_in_batch=num_items_in_batch, **kwargs)
        inputs = {k: v for k, v in kwargs.items() if k in _ENCODER_INPUTS}
        selected = labels != -100
        use_layer = last_layer is not None and last_layer.usable()
        if slots is not None:
            positions, valid = labelled_slots(selected, slots)
            if use_layer:
                last_layer.positions = positions
        else:
            valid = last_layer.set(selected) if use_layer else None
        try:
            hidden = encoder(input_ids=input_ids, attention_mask=attention_mask, **inputs)[0]
        finally:
            if last_layer is not None:
                last_layer.positions = None
        if slots is not None:
            if not use_layer:  # (rows, length, hidden) -> (rows, slots, hidden)
                hidden = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.size(-1)))
            logits = head(hidden)
            targets = labels.gather(1, positions).masked_fill(~valid, -100)
            loss = masked_lm_loss(logits, targets, num_items_in_batch)
            return SlotMaskedLMOutput(loss=loss, logits=logits, slot_positions=positions)
        hidden = hidden[selected if valid is None else valid]
        logits = head(hidden)
        loss = masked_lm_loss(logits, labels[selected], num_items_in_batch, all_labelled=True)
        return MaskedLMOutput(loss=loss, logits=logits)

    return forward


# Attention functions that take fewer queries than keys with the model's own mask; the
# FlashAttention kernels unpad queries and keys with one 2D mask, so they keep the full layer.
_SUBSET_ATTENTION = {"eager", "sdpa", ATTENTION_NAME}
# What the encoder hands its layers for cross-attention and caches, not for the attention function.
_LAYER_ONLY = {"encoder_hidden_states", "encoder_attention_mask", "past_key_values"}


def _bert_layer(layer):
    """(query, key, value, attention module, finish) of a BertLayer-shaped layer (BERT, RoBERTa, ELECTRA...)."""
    attention = layer.attention.self

    def finish(attended, inputs):
        attended = layer.attention.output(attended, inputs)
        return apply_chunking_to_forward(layer.feed_forward_chunk, layer.chunk_size_feed_forward, 1, attended)

    return attention.query, attention.key, attention.value, attention, finish


def _distilbert_layer(layer):
    attention = layer.attention

    def finish(attended, inputs):
        attended = layer.sa_layer_norm(attention.out_lin(attended) + inputs)
        return layer.output_layer_norm(layer.ffn(attended) + attended)

    return attention.q_lin, attention.k_lin, attention.v_lin, attention, finish


# Post-LayerNorm encoder layers, self-attention only, whose forward this reproduces.
LAYERS = {name: _bert_layer for name in ("BertLayer", "RobertaLayer", "XLMRobertaLayer", "CamembertLayer",
                                         "Data2VecTextLayer", "ElectraLayer")}
LAYERS["TransformerBlock"] = _distilbert_layer


class LabelledPositions:
    """The encoder's last layer, patched to compute its output at the labelled positions only.

    `set(selected)` stores, per row, the labelled positions padded to the row with the most
    (B, M); the next call of the layer returns (B, M, hidden) states at those positions, of
    which the returned (B, M) mask keeps the real ones, in the order of `hidden[selected]`
    (None, and nothing stored, when no position is labelled).
    Without stored positions (no labels, generation, pipelines) the layer is its usual self.
    """

    def __init__(self, layer, parts):
        self.positions = None
        self.query, self.key, self.value, self.attention, self.finish = parts
        full = layer.forward

        @functools.wraps(full)
        def forward(hidden_states, attention_mask=None, *args, **kwargs):
            if self.positions is None:
                return full(hidden_states, attention_mask, *args, **kwargs)
            return self.forward(hidden_states, attention_mask, **kwargs)

        layer.forward = forward

    def usable(self) -> bool:
        return self.attention.config._attn_implementation in _SUBSET_ATTENTION

    def set(self, selected: torch.Tensor) -> torch.Tensor | None:
        counts = selected.sum(dim=1)
        most = int(counts.max())
        if most == 0:  # nothing labelled: the full layer, whose outputs go nowhere
            return None
        self.positions, valid = labelled_slots(selected, most)
        return valid

    def forward(self, hidden, mask, **kwargs):
        positions, (rows, length, width) = self.positions, hidden.shape
        picked = positions.size(1)
        inputs = hidden.gather(1, positions[..., None].expand(rows, picked, width))
        head_size = self.attention.attention_head_size
        heads = self.query.out_features // head_size
        query = self.query(inputs).view(rows, picked, heads, head_size).transpose(1, 2)
        key = self.key(hidden).view(rows, length, heads, head_size).transpose(1, 2)
        value = self.value(hidden).view(rows, length, heads, head_size).transpose(1, 2)
        if mask is not None and mask.dim() == 4 and mask.size(-2) == length:  # one mask row per query
            mask = mask.gather(2, positions[:, None, :, None].expand(rows, mask.size(1), picked, length))
        # The model's own attention function, as its attention module would pick it.
        eager = sys.modules[type(self.attention).__module__].eager_attention_forward
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.attention.config._attn_implementation, eager)
        kwargs = {k: v for k, v in kwargs.items() if k not in _LAYER_ONLY}
        dropout = self.attention.dropout.p if self.attention.training else 0.0
        attended, _ = attend(self.attention, query, key, value, mask, dropout=dropout,
                             scaling=self.attention.scaling, **kwargs)
        return self.finish(attended.reshape(rows, picked, -1), inputs)


def _labelled_positions(model, encoder) -> LabelledPositions | None:
    """The last layer's patch, where its class and configuration are ones this reproduces."""
    layers = getattr(getattr(encoder, "encoder", None) or getattr(encoder, "transformer", None), "layer", None)
    if not layers or type(layers[-1]).__name__ not in LAYERS or getattr(model.config, "is_decoder", False):
        return None
    return LabelledPositions(layers[-1], LAYERS[type(layers[-1]).__name__](layers[-1]))


def install_mlm_head(model, sparse: bool = True, last_layer: bool = True, slots: int | None = None) -> str:
    """Give `model` the sparse (or dense) MLM forward; returns what it got, to log.

    The forward of a model given labels returns our loss and, when sparse, logits for the
    masked positions only (and, with `last_layer`, the last encoder layer's output computed
    there only). Without labels (fill-mask, pipelines) it is the model's own. `slots`: the
    fixed number of predictions per row that XLA needs (None: as many as were masked).
    """
    name = type(model).__name__
    # The Trainer then passes num_items_in_batch and scales for the number of processes.
    model.accepts_loss_kwargs = True
    if sparse and name in NATIVE_SPARSE and slots is None:
        # Native path: selects labelled positions and divides by num_items_in_batch itself.
        model.sparse_prediction = True
        model.sparse_pred_ignore_index = -100
        return "native sparse"
    if sparse and name in FAMILIES:
        encoder, head = FAMILIES[name](model)
        positions = _labelled_positions(model, encoder) if last_layer else None
        model.forward = _sparse(model.forward, encoder, head, positions, slots)
        if positions is not None:
            logger.info("The last encoder layer computes its output at masked positions only (eager, SDPA or CPU "
                        "attention; other attention implementations run it whole)")
        return "sparse" if slots is None else f"sparse, {slots} prediction slots per block"
    if sparse and name in NATIVE_SPARSE:
        logger.info("Sparse prediction for %s on XLA: its own sparse head changes shape with every batch; the MLM "
                    "head runs on every position", name)
    elif sparse:
        logger.info("Sparse prediction is not available for %s: the MLM head runs on every position", name)
    model.forward = _with_our_loss(model.forward)
    return "dense"


def predictions_at_labels(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Predicted ids shaped like `labels` (-100 where unlabelled), from dense, sparse or slot logits."""
    positions = None
    if isinstance(logits, tuple):  # extra outputs: the slot head's positions, or a model's own
        logits, positions = logits[0], (logits[1] if len(logits) == 2 and logits[1].shape == logits[0].shape[:2]
                                        else None)
    predicted = logits.argmax(dim=-1)
    if positions is not None:  # slots: back to their positions, fixed shapes (XLA)
        slotted = torch.where(labels.gather(1, positions) != -100, predicted.to(labels.dtype), -100)
        return torch.full_like(labels, -100).scatter(1, positions, slotted)
    if predicted.shape == labels.shape:
        return predicted
    full = torch.full_like(labels, -100)
    full[labels != -100] = predicted.to(labels.dtype)
    return full
