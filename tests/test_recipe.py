"""The from-scratch recipe: what a from-scratch run takes when the user does not say (utils/train/recipe.py)."""

import json

import yaml

from run_mlm import main
from utils.train.model_card import RUN_ARGS_FILE

from .conftest import tiny_run_args


def without(args, *flags):
    """`args` without the given flags and their values."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in flags:
            skip = True
            continue
        out.append(arg)
    return out


def run(tmp_path, corpus, caplog, *extra, drop=("--learning_rate", "--warmup_steps", "--scratch_recipe")):
    out = tmp_path / "out"
    with caplog.at_level("INFO"):
        main(without(tiny_run_args(out, corpus, "--max_steps", "3", *extra), *drop))
    return yaml.safe_load((out / RUN_ARGS_FILE).read_text()), json.loads((out / "config.json").read_text())


def test_from_scratch_without_a_learning_rate_takes_the_recipe_and_says_so(corpus, tmp_path, caplog):
    args, config = run(tmp_path, corpus, caplog)
    # Saved in the run's args file: a rerun trains the same, whatever a later version's recipe.
    assert args["learning_rate"] == 5e-4 and args["warmup_steps"] == 0.06 and args["mlm_probability"] == 0.3
    assert args["lr_scheduler_type"] == "warmup_stable_decay"
    assert args["lr_scheduler_kwargs"] == {"num_decay_steps": 0.2, "decay_type": "1-sqrt"}
    assert config["hidden_dropout_prob"] == 0 and config["attention_probs_dropout_prob"] == 0
    assert "From scratch, settings not given take this project's recipe" in caplog.text
    assert "learning_rate 0.0005" in caplog.text and "dropout 0 (hidden_dropout_prob, attention_probs_dropout_prob)" \
        in caplog.text


def test_what_the_user_gives_stays(corpus, tmp_path, caplog):
    overrides = ("hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,"
                 "max_position_embeddings=64,hidden_dropout_prob=0.2")
    args, config = run(tmp_path, corpus, caplog, "--learning_rate", "3e-4", "--warmup_steps", "0.1",
                       "--config_overrides", overrides, drop=("--scratch_recipe",))
    assert args["learning_rate"] == 3e-4 and args["warmup_steps"] == 0.1
    assert config["hidden_dropout_prob"] == 0.2 and config["attention_probs_dropout_prob"] == 0  # only the one given


def test_scratch_recipe_false_keeps_transformers_defaults(corpus, tmp_path, caplog):
    args, config = run(tmp_path, corpus, caplog, "--scratch_recipe", "false", drop=("--learning_rate",
                                                                                  "--warmup_steps"))
    assert "learning_rate" not in args and "warmup_steps" not in args  # 5e-5 and 0, transformers' own
    assert config["hidden_dropout_prob"] == 0.1
    assert "this project's recipe" not in caplog.text


def test_adapting_a_pretrained_model_keeps_its_settings(corpus, tmp_path, caplog):
    first = tmp_path / "first"
    main(tiny_run_args(first, corpus, "--max_steps", "2", "--do_eval", "false",
                       "--config_overrides", "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,"
                       "intermediate_size=64,max_position_embeddings=64,hidden_dropout_prob=0.1"))
    out = tmp_path / "adapted"
    with caplog.at_level("INFO"):
        main(without(tiny_run_args(out, corpus, "--max_steps", "2", "--model_name_or_path", str(first)),
                     "--model_type", "--config_overrides", "--tokenizer_vocab_size", "--learning_rate",
                     "--warmup_steps"))
    args = yaml.safe_load((out / RUN_ARGS_FILE).read_text())
    assert "learning_rate" not in args and json.loads((out / "config.json").read_text())["hidden_dropout_prob"] == 0.1
    assert "this project's recipe" not in caplog.text
