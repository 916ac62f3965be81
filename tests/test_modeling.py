"""Model configs, the position limit check, and building models from scratch."""

from types import SimpleNamespace

import pytest
from transformers import CONFIG_MAPPING

from utils.data.tokenizer import train_wordpiece_tokenizer
from utils.errors import UsageError
from utils.model.modeling import (
    build_model,
    fit_config_to_tokenizer,
    load_config,
    position_limit,
    resolve_max_seq_length,
)


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece_tokenizer(["one two three four five six"] * 20, vocab_size=60, model_max_length=512)


def model_args(**overrides):
    values = dict(model_name_or_path=None, config_name=None, model_type="bert", config_overrides=None,
                  cache_dir=None, model_revision="main", token=None, trust_remote_code=False, dtype=None)
    values.update(overrides)
    return SimpleNamespace(**values)


def test_position_limit_accounts_for_roberta_offset():
    assert position_limit(CONFIG_MAPPING["bert"]()) == 512
    assert position_limit(CONFIG_MAPPING["roberta"]()) == 510  # padding_idx 1: positions start at 2
    roberta = CONFIG_MAPPING["roberta"](pad_token_id=0)
    assert position_limit(roberta) == 511


def test_pretrained_roberta_at_512_is_refused_with_the_limit(tokenizer):
    # The reference crashes here with an index error deep in the embeddings (transformers#22495).
    config = CONFIG_MAPPING["roberta"]()
    with pytest.raises(UsageError, match=r"--max_seq_length 512 exceeds the 510 positions .* 510 or less"):
        resolve_max_seq_length(512, tokenizer, config, from_scratch=False, overrides=None)


def test_from_scratch_grows_the_position_table_unless_the_user_set_it(tokenizer, caplog):
    config = CONFIG_MAPPING["roberta"]()
    assert resolve_max_seq_length(512, tokenizer, config, from_scratch=True, overrides=None) == 512
    assert config.max_position_embeddings == 514 and position_limit(config) == 512
    config = CONFIG_MAPPING["bert"](max_position_embeddings=64)
    with pytest.raises(UsageError, match="raise max_position_embeddings in --config_overrides"):
        resolve_max_seq_length(128, tokenizer, config, from_scratch=True, overrides="max_position_embeddings=64")


def test_tokenizer_limit_and_default_length(tokenizer):
    config = CONFIG_MAPPING["bert"]()
    small = train_wordpiece_tokenizer(["a b c"] * 5, vocab_size=40, model_max_length=128)
    with pytest.raises(UsageError, match=r"exceeds the tokenizer's model_max_length \(128\)"):
        resolve_max_seq_length(256, small, config, from_scratch=False, overrides=None)
    assert resolve_max_seq_length(None, small, config, from_scratch=False, overrides=None) == 128
    assert resolve_max_seq_length(None, tokenizer, CONFIG_MAPPING["modernbert"](), False, None) == 512


def test_config_overrides_apply_and_bad_ones_name_the_flag():
    config = load_config(model_args(config_overrides="num_hidden_layers=3,hidden_size=48"))
    assert config.num_hidden_layers == 3 and config.hidden_size == 48
    with pytest.raises(UsageError, match="--config_overrides 'no_such_key=1'"):
        load_config(model_args(config_overrides="no_such_key=1"))


def test_missing_local_model_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match=r"--model_name_or_path .*nothing-here: cannot load"):
        load_config(model_args(model_name_or_path=str(tmp_path / "nothing-here")))


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert", "albert", "electra", "modernbert"])
def test_build_from_scratch_fits_the_tokenizer_and_saves(model_type, tokenizer, tmp_path):
    overrides = {
        "distilbert": "dim=32,n_layers=1,n_heads=2,hidden_dim=64",
        "albert": "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64,embedding_size=16",
        "modernbert": "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64",
    }.get(model_type, "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64")
    args = model_args(model_type=model_type, config_overrides=overrides)
    config = load_config(args)
    fit_config_to_tokenizer(config, tokenizer)
    model = build_model(args, config, tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(["one two three", "four five"], padding=True, return_tensors="pt")
    logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tokenizer))
    # Derived config fields follow the overrides (ModernBERT's layer_types once did not,
    # and saving failed after training).
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
