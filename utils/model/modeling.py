"""Model configuration and construction: pretrained, or from scratch with overrides."""

from __future__ import annotations

import logging

import torch
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForMaskedLM
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from utils.backend import Backend
from utils.errors import UsageError, one_line

logger = logging.getLogger(__name__)

MLM_MODEL_TYPES = tuple(MODEL_FOR_MASKED_LM_MAPPING_NAMES)

# These families number positions from padding_idx + 1 (RoBERTa's convention), so a
# table of 512 holds sequences of at most 512 - padding_idx - 1 tokens (transformers#22495).
POSITION_OFFSET_MODEL_TYPES = {
    "camembert", "data2vec-text", "esm", "ibert", "longformer", "luke", "mpnet", "roberta",
    "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl", "xmod",
}


def _hub_kwargs(model_args) -> dict:
    return {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }


def load_config(model_args):
    """The model configuration: from `config_name`, `model_name_or_path`, or `model_type` + `config_overrides`."""
    source, flag = (
        (model_args.config_name, "config_name") if model_args.config_name else
        (model_args.model_name_or_path, "model_name_or_path")
    )
    if source:
        try:
            return AutoConfig.from_pretrained(source, **_hub_kwargs(model_args))
        except (OSError, ValueError) as e:
            raise UsageError(f"--{flag} {source}: cannot load a model configuration ({one_line(e)})") from e
    config_class = CONFIG_MAPPING[model_args.model_type]
    if not model_args.config_overrides:
        return config_class()
    logger.info("Overriding config: %s", model_args.config_overrides)
    # update_from_string parses and types the values; building a fresh config from them
    # then recomputes derived fields (ModernBERT's layer_types follows num_hidden_layers).
    parsed = config_class()
    try:
        parsed.update_from_string(model_args.config_overrides)
    except ValueError as e:
        raise UsageError(f"--config_overrides {model_args.config_overrides!r}: {one_line(e)}") from e
    keys = [pair.split("=", 1)[0].strip() for pair in model_args.config_overrides.split(",") if pair.strip()]
    try:
        config = config_class(**{key: getattr(parsed, key) for key in keys})
        validate = getattr(config, "validate", None)
        if validate is not None:
            validate()  # otherwise an invalid config only fails when the trained model is saved
    except (ValueError, TypeError) as e:
        raise UsageError(f"--config_overrides {model_args.config_overrides!r}: {one_line(e)}") from e
    return config


def position_limit(config) -> int | None:
    """The longest sequence the model's position embeddings can take (None when unbounded)."""
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions is None:
        return None
    if config.model_type in POSITION_OFFSET_MODEL_TYPES:
        return max_positions - (config.pad_token_id or 0) - 1
    return max_positions


def config_and_block_length(model_args, tokenizer, requested: int | None):
    """The model configuration (fitted to the tokenizer when new) and the block length it can take."""
    config = load_config(model_args)
    if model_args.from_scratch:
        fit_config_to_tokenizer(config, tokenizer)
    return config, resolve_max_seq_length(requested, tokenizer, config, model_args.from_scratch,
                                          model_args.config_overrides)


def check_block_length_early(model_args, requested: int | None) -> None:
    """Refuse a --max_seq_length beyond the model's position table before any data or tokenizer work.

    The exact check (`resolve_max_seq_length`) needs the tokenizer, which from scratch is
    trained first; a length past `max_position_embeddings` is refused either way, so say so
    before that work. From scratch the table grows to fit, unless --config_overrides sets it.
    """
    if requested is None:
        return
    config = load_config(model_args)
    set_by_user = model_args.config_overrides is not None and "max_position_embeddings" in model_args.config_overrides
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and requested > positions and (set_by_user or not model_args.from_scratch):
        unbounded = type("AnyLength", (), {"model_max_length": 1 << 62})()
        resolve_max_seq_length(requested, unbounded, config, model_args.from_scratch, model_args.config_overrides)


def resolve_max_seq_length(requested: int | None, tokenizer, config, from_scratch: bool, overrides: str | None) -> int:
    """The block length: `requested` when the tokenizer and the model can take it, else a clear error.

    Unset, it is the smaller of the tokenizer's and the model's limits (at most 1024, as in
    the reference). From scratch, a position table too short for `requested` is grown,
    unless the user set its size in --config_overrides: there are no trained weights to keep.
    """
    model_limit = position_limit(config)
    # Tokenizers with no declared limit report a huge sentinel (VERY_LARGE_INTEGER).
    tokenizer_limit = tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else None
    if requested is None:
        limits = [n for n in (model_limit, tokenizer_limit, 1024) if n is not None]
        return min(limits)
    if requested < 2:
        raise UsageError(f"--max_seq_length {requested} is too short; use at least 2 (typically 128 or 512)")
    if model_limit is not None and requested > model_limit:
        set_by_user = overrides is not None and "max_position_embeddings" in overrides
        if from_scratch and not set_by_user:
            grown = requested + (config.max_position_embeddings - model_limit)
            logger.info("Growing max_position_embeddings from %d to %d to fit --max_seq_length %d",
                        config.max_position_embeddings, grown, requested)
            config.max_position_embeddings = grown
        else:
            raise UsageError(
                f"--max_seq_length {requested} exceeds the {model_limit} positions this {config.model_type} model "
                f"has; use --max_seq_length {model_limit} or less"
                + ("" if not from_scratch else " or raise max_position_embeddings in --config_overrides")
            )
    if tokenizer_limit is not None and requested > tokenizer_limit and not from_scratch:
        raise UsageError(
            f"--max_seq_length {requested} exceeds the tokenizer's model_max_length ({tokenizer_limit}); "
            f"use --max_seq_length {tokenizer_limit} or less"
        )
    return requested


# Families whose FlashAttention-2 path does work SDPA cannot, even on packed blocks: ModernBERT's
# local layers attend within a window, which FA2 computes as such and SDPA as a full masked pass.
FA2_ON_BLOCKS = {"modernbert"}


def choose_attention(requested: str, training_args, config=None, padded_rows: bool = False) -> str | None:
    """The attention implementation to ask transformers for (None: the model's default, SDPA).

    "auto" takes FlashAttention-2 only where it does less work than SDPA: on a CUDA GPU in
    bf16/fp16 with `flash_attn` installed, for a family that has an FA2 path, and either on
    rows padded to different lengths (FA2 skips the padding; SDPA with a padding mask falls
    back from its flash kernel) or for a family in FA2_ON_BLOCKS. Packed blocks without
    padding keep SDPA: its flash kernel does the same work there, and SDPA keeps the
    masked-positions-only last layer of the sparse head.
    """
    if requested != "auto":
        return requested
    from transformers.utils import is_flash_attn_2_available

    half = training_args.bf16 or training_args.fp16
    if not (Backend.of(training_args).flash_attention and half and is_flash_attn_2_available()):
        return None
    if config is not None:
        model_class = AutoModelForMaskedLM._model_mapping.get(type(config), None)
        if not getattr(model_class, "_supports_flash_attn", False):
            return None
        if not padded_rows and config.model_type not in FA2_ON_BLOCKS:
            return None
    return "flash_attention_2"


def build_model(model_args, config, tokenizer, attn_implementation: str | None = None):
    """Load pretrained weights or initialise a new model; make the embeddings cover the tokenizer."""
    dtype = None if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    attention = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if model_args.model_name_or_path:
        try:
            model = AutoModelForMaskedLM.from_pretrained(
                model_args.model_name_or_path,
                config=config,
                dtype=model_args.dtype if model_args.dtype == "auto" else dtype,
                **attention,
                # Pickled weights (pytorch_model.bin) can run code when loaded: safetensors only, unless asked.
                use_safetensors=None if getattr(model_args, "allow_pickle_weights", False) else True,
                **_hub_kwargs(model_args),
            )
        except (OSError, ValueError) as e:
            hint = ""
            if "safetensors" in str(e).lower() and not getattr(model_args, "allow_pickle_weights", False):
                hint = ("; it has no safetensors weights: pass --allow_pickle_weights to load pickled weights "
                        "(pytorch_model.bin) if you trust their source")
            raise UsageError(f"--model_name_or_path {model_args.model_name_or_path}: cannot load the model "
                             f"({one_line(e)}){hint}") from e
    else:
        logger.info("Training a new %s model from scratch", config.model_type)
        try:
            model = AutoModelForMaskedLM.from_config(
                config, trust_remote_code=model_args.trust_remote_code, dtype=dtype, **attention
            )
        except (ValueError, ImportError) as e:
            raise UsageError(f"--attn_implementation {attn_implementation}: {one_line(e)}") from e
    logger.info("Model: %s, %.2fM parameters, attention %s", type(model).__name__, count_parameters(model) / 1e6,
                model.config._attn_implementation)
    cover_tokenizer(model, tokenizer)
    return model


def tied_parameter_names(model) -> set[str]:
    """Names of the parameters that are one tensor under several names (the tied vocabulary matrix,
    BERT's decoder bias and its alias `cls.predictions.bias`)."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return {name for group in names.values() if len(group) > 1 for name in group}


def count_parameters(model) -> int:
    """The model's parameter count, also where DeepSpeed ZeRO-3 left each rank an empty shard of them.

    Under ZeRO-3 `numel()` is 0 on every rank and the real count is the parameter's
    `ds_numel`; under FSDP2 parameters are DTensors, whose `numel()` is already the whole
    tensor's.
    """
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def cover_tokenizer(model, tokenizer) -> None:
    """Grow the embedding table when the tokenizer has more tokens than it has rows (it would index past its end).

    The table's size comes from the module (`num_embeddings`), not from the weight, which
    ZeRO-3 leaves empty on every rank; a table padded beyond the tokenizer (ModernBERT's
    50368 for 50280 tokens) is left as it is.
    """
    embeddings = model.get_input_embeddings()
    size = getattr(embeddings, "num_embeddings", None) or model.config.vocab_size
    if len(tokenizer) > size:
        logger.info("Resizing token embeddings from %d to %d", size, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))


def fit_config_to_tokenizer(config, tokenizer) -> None:
    """From scratch: size the vocabulary and special ids to the tokenizer the model will read.

    A BERT-style tokenizer has no bos/eos tokens; its [CLS]/[SEP] play those roles, so
    configs that name bos/eos ids (RoBERTa, ModernBERT) point at them instead of at ids
    that do not exist in the new vocabulary.
    """
    config.vocab_size = len(tokenizer)
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "cls_token_id": tokenizer.cls_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id,
        "eos_token_id": tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id,
    }
    for name, token_id in ids.items():
        if hasattr(config, name) or name == "pad_token_id":
            setattr(config, name, token_id)
