"""The MLM head and loss: predict only the masked positions ("sparse prediction").

Only ~15% of positions carry a label, yet transformers' MLM models project every position
onto the vocabulary; for a 6-layer, 384-wide BERT with a 30522-token vocabulary that dense
head is more than half of the training FLOPs. Here the encoder's hidden states at masked
positions alone go through the head and the loss. The loss is the same number (a test
compares it with the dense head's).

`install_mlm_head` makes the model an instance of a subclass of its own class
(`SparseBertForMaskedLM`, printed so by `print(model)`), whose forward is a method: no
closures on instances, nothing that depends on call order, right in `nn.DataParallel`
replicas. Parameters, state dict and saved checkpoints are the family's own.

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
masked tokens at that number (`utils.data.masking.cap_selection`), so no label is lost.

The loss is summed over masked tokens and divided by `num_items_in_batch`, the Trainer's
count of masked tokens in the whole global batch, so that it is their exact mean on 1 or
N processes and with gradient accumulation (see `utils.model.loss`).
"""

from __future__ import annotations

import functools
import logging
import sys
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import MaskedLMOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.pytorch_utils import apply_chunking_to_forward

from utils.model.cpu_attention import ATTENTION_NAME
from utils.model.loss import masked_lm_loss

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


MASKED_POSITIONS = "masked_positions"  # the keyword the encoder hands its layers (see MaskedPositionsLayer)
_CLASSES: dict[tuple[type, type], type] = {}


def _subclass(base: type, mixin: type, shown_as: str) -> type:
    """`base` with `mixin`'s behaviour, printed as `shown_as`; one class per (base, mixin).

    The class keeps its family's `__name__`: transformers writes that name into a saved
    checkpoint's `architectures` and reads it for the loss type, so checkpoints stay the
    family's own. `print(model)` shows `shown_as` (nn.Module's `_get_name`).
    """
    if (base, mixin) not in _CLASSES:
        namespace = {"__module__": __name__, "__qualname__": shown_as, "shown_as": shown_as,
                     "mlm_origin": (base, mixin)}
        if "forward" in mixin.__dict__:
            # The Trainer reads the model's argument names from forward's signature.
            namespace["forward"] = functools.wraps(base.forward)(
                lambda self, *args, **kwargs: mixin.forward(self, *args, **kwargs))
        _CLASSES[base, mixin] = type(base.__name__, (mixin, base), namespace)
    return _CLASSES[base, mixin]


def _rebuilt(base: type, mixin: type, shown_as: str, state: dict):
    """An instance of `_subclass(base, mixin, shown_as)` with `state`: how pickle and deepcopy rebuild one."""
    cls = _subclass(base, mixin, shown_as)  # made again in a process that unpickles it
    instance = cls.__new__(cls)
    instance.__dict__.update(state)
    return instance


class _MadeAtRunTime:
    """What the classes `_subclass` makes share: their printed name, and pickling as their family's class plus the
    mixin (importable names), since the subclass itself is made at run time."""

    shown_as: str
    mlm_origin: tuple[type, type]  # (the family's class, the mixin)

    @property
    def family(self) -> str:
        """The family's class name (FAMILIES, LAYERS), whatever wraps the class later (FSDP2: FSDP<name>)."""
        return self.mlm_origin[0].__name__

    def _get_name(self):
        return type(self).__name__.replace(self.family, self.shown_as)  # FSDPBertForMaskedLM: FSDPSparseBert...

    def __reduce_ex__(self, protocol):
        return _rebuilt, (*self.mlm_origin, self.shown_as, self.__dict__)


class MLMHead(_MadeAtRunTime):
    """What every model given an MLM head by `install_mlm_head` shares: its name in print(model), its settings."""

    mlm_slots: int | None = None  # XLA's fixed number of prediction slots per row (None: as many as masked)
    mlm_last_layer: bool = False  # the last encoder layer computes the masked positions only


class MLMLoss(MLMHead):
    """A masked LM whose loss, given labels, is summed over masked tokens / `num_items_in_batch`; the head runs on
    every position."""

    def extra_repr(self) -> str:
        return "MLM head on every position; loss summed over masked tokens / their count in the global batch"

    def forward(self, *args, labels=None, num_items_in_batch=None, **kwargs):
        outputs = super().forward(*args, **kwargs)
        if labels is not None:
            outputs["loss"] = masked_lm_loss(outputs["logits"], labels, num_items_in_batch)
        return outputs


class NativeSparseMLM(MLMHead):
    """A model whose own forward predicts masked positions only (ModernBERT's `sparse_prediction`) and divides by
    `num_items_in_batch` itself."""

    def extra_repr(self) -> str:
        return "MLM head on masked positions only (the model's own sparse_prediction)"


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


# Attention functions that take fewer queries than keys with the model's own mask; the
# FlashAttention kernels unpad queries and keys with one 2D mask, so they keep the full layer.
_SUBSET_ATTENTION = {"eager", "sdpa", ATTENTION_NAME}


class SparseMLM(MLMLoss):
    """A masked LM whose head and loss, given labels, run on the labelled positions only.

    The encoder runs on all positions; with `mlm_last_layer`, its last layer (a
    `MaskedPositionsLayer`) is handed the labelled positions and computes its output there
    only. With `mlm_slots` (XLA), every row has that many prediction slots: the same shapes
    whatever was masked. Logits are (masked tokens, vocab), or (rows, slots, vocab) with slots.
    """

    def extra_repr(self) -> str:
        where = f"{self.mlm_slots} prediction slots per row" if self.mlm_slots else "masked positions only"
        return f"MLM head on {where}; loss summed over masked tokens / their count in the global batch"

    def forward(self, input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, **kwargs):
        slots = self.mlm_slots
        if labels is None or (labels.device.type == "xla" and slots is None):
            return MLMLoss.forward(self, input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                   num_items_in_batch=num_items_in_batch, **kwargs)
        encoder, head = FAMILIES[self.family](self)
        inputs = {k: v for k, v in kwargs.items() if k in _ENCODER_INPUTS}
        selected = labels != -100
        use_layer = self.mlm_last_layer and self.config._attn_implementation in _SUBSET_ATTENTION
        valid = None
        if slots is not None:
            positions, valid = labelled_slots(selected, slots)
            if use_layer:
                inputs[MASKED_POSITIONS] = positions
        elif use_layer:
            most = int(selected.sum(dim=1).max())
            if most:  # nothing labelled: the full layer, whose outputs go nowhere
                inputs[MASKED_POSITIONS], valid = labelled_slots(selected, most)
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask, **inputs)[0]
        if slots is not None:
            if MASKED_POSITIONS not in inputs:  # (rows, length, hidden) -> (rows, slots, hidden)
                hidden = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.size(-1)))
            logits = head(hidden)
            targets = labels.gather(1, positions).masked_fill(~valid, -100)
            loss = masked_lm_loss(logits, targets, num_items_in_batch)
            return SlotMaskedLMOutput(loss=loss, logits=logits, slot_positions=positions)
        hidden = hidden[selected if valid is None else valid]
        logits = head(hidden)
        loss = masked_lm_loss(logits, labels[selected], num_items_in_batch, all_labelled=True)
        return MaskedLMOutput(loss=loss, logits=logits)


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


class MaskedPositionsLayer(_MadeAtRunTime):
    """An encoder layer that, handed `masked_positions` (rows, M), computes its output there only.

    What a post-LayerNorm layer computes at a position feeds only that position's output, so
    for the masked positions it needs keys and values at every position, but queries,
    attention output, feed-forward and LayerNorms at those M alone; it returns (rows, M,
    hidden). The positions come as a keyword through the encoder (transformers hands its
    layers the model's extra keywords), so nothing is stored on the module. Without them
    (no labels, generation, pipelines) the layer is its family's own.
    """

    def extra_repr(self) -> str:
        return "given masked_positions: queries, attention output and feed-forward there only"

    def forward(self, hidden_states, attention_mask=None, *args, masked_positions=None, **kwargs):
        if masked_positions is None:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        query_proj, key_proj, value_proj, attention, finish = LAYERS[self.family](self)
        positions, (rows, length, width) = masked_positions, hidden_states.shape
        picked = positions.size(1)
        inputs = hidden_states.gather(1, positions[..., None].expand(rows, picked, width))
        head_size = attention.attention_head_size
        heads = query_proj.out_features // head_size
        query = query_proj(inputs).view(rows, picked, heads, head_size).transpose(1, 2)
        key = key_proj(hidden_states).view(rows, length, heads, head_size).transpose(1, 2)
        value = value_proj(hidden_states).view(rows, length, heads, head_size).transpose(1, 2)
        mask = attention_mask
        if mask is not None and mask.dim() == 4 and mask.size(-2) == length:  # one mask row per query
            mask = mask.gather(2, positions[:, None, :, None].expand(rows, mask.size(1), picked, length))
        # The model's own attention function, as its attention module would pick it.
        eager = sys.modules[type(attention).__module__].eager_attention_forward
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager)
        kwargs = {k: v for k, v in kwargs.items() if k not in _LAYER_ONLY}
        dropout = attention.dropout.p if attention.training else 0.0
        attended, _ = attend(attention, query, key, value, mask, dropout=dropout, scaling=attention.scaling,
                             **kwargs)
        return finish(attended.reshape(rows, picked, -1), inputs)


def _last_layer(model, encoder) -> nn.Module | None:
    """The encoder's last layer, where its class and configuration are ones MaskedPositionsLayer reproduces."""
    layers = getattr(getattr(encoder, "encoder", None) or getattr(encoder, "transformer", None), "layer", None)
    if not layers or type(layers[-1]).__name__ not in LAYERS or getattr(model.config, "is_decoder", False):
        return None
    return layers[-1]


def install_mlm_head(model, sparse: bool = True, last_layer: bool = True, slots: int | None = None) -> str:
    """Make `model` one of the MLM classes above (in place); returns what it got, to log.

    The model's class becomes a subclass of its own (`SparseBertForMaskedLM` for a
    BertForMaskedLM, and its last layer a `BertLayerAtMaskedPositions`), the way torch's
    `fully_shard` makes a module an `FSDP<class>`: same parameters, same state dict, same
    saved checkpoint, shown by `print(model)`. Given labels, its forward returns our loss
    and, when sparse, logits for the masked positions only. Without labels (fill-mask,
    pipelines) it is the model's own. `slots`: the fixed number of predictions per row that
    XLA needs (None: as many as were masked).
    """
    if isinstance(model, MLMHead):
        raise ValueError(f"{model._get_name()} already has its MLM head installed")
    name = type(model).__name__
    # The Trainer then passes num_items_in_batch and scales for the number of processes.
    model.accepts_loss_kwargs = True
    if sparse and name in NATIVE_SPARSE and slots is None:
        # Native path: selects labelled positions and divides by num_items_in_batch itself.
        model.sparse_prediction = True
        model.sparse_pred_ignore_index = -100
        model.__class__ = _subclass(type(model), NativeSparseMLM, f"Sparse{name}")
        return "native sparse"
    if sparse and name in FAMILIES:
        layer = _last_layer(model, FAMILIES[name](model)[0]) if last_layer else None
        if layer is not None:
            layer_name = type(layer).__name__
            layer.__class__ = _subclass(type(layer), MaskedPositionsLayer, f"{layer_name}AtMaskedPositions")
            logger.info("The last encoder layer computes its output at masked positions only (eager, SDPA or CPU "
                        "attention; other attention implementations run it whole)")
        model.__class__ = _subclass(type(model), SparseMLM, f"Sparse{name}")
        model.mlm_slots, model.mlm_last_layer = slots, layer is not None
        return "sparse" if slots is None else f"sparse, {slots} prediction slots per block"
    if sparse and name in NATIVE_SPARSE:
        logger.info("Sparse prediction for %s on XLA: its own sparse head changes shape with every batch; the MLM "
                    "head runs on every position", name)
    elif sparse:
        logger.info("Sparse prediction is not available for %s: the MLM head runs on every position", name)
    model.__class__ = _subclass(type(model), MLMLoss, name)
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
