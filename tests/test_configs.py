"""Every args file in configs/ runs as shipped (a few steps): the README's recipes, the way a user types them."""

import json
import math
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from run_mlm import main

from .conftest import REPO

CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
# What each config trains: model type, the saved tokenizer's class and mask token.
EXPECTED = {
    "quickstart.yaml": ("modernbert", "TokenizersBackend", "[MASK]"),  # WordPiece in the generic class
    "roberta_from_scratch.yaml": ("roberta", "TokenizersBackend", "<mask>"),
    "quickstart_downstream.yaml": ("modernbert", "TokenizersBackend", "[MASK]"),
}
# Shorter than shipped where a config's extra work would dominate: one seed, a few fine-tuning steps.
SHORTER = {"quickstart_downstream.yaml": ["--downstream_seeds", "1", "--downstream_num_train_epochs", "0.1"]}


def test_every_config_has_an_expectation():
    assert set(CONFIGS) == set(EXPECTED)


@pytest.mark.parametrize("config", CONFIGS)
def test_config_runs_as_shipped(config, tmp_path, capsys):
    out = tmp_path / "out"
    metrics = main([str(REPO / "configs" / config), "--output_dir", str(out), "--max_steps", "3",
                    "--eval_steps", "3", "--max_eval_samples", "32", "--logging_steps", "1",
                    "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
                    *SHORTER.get(config, [])])
    assert math.isfinite(metrics["eval_loss"]) and metrics["train_samples"] > 0
    model_type, tokenizer_class, mask = EXPECTED[config]
    assert json.loads((out / "config.json").read_text())["model_type"] == model_type
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(tokenizer).__name__ == tokenizer_class and tokenizer.mask_token == mask
    printed = capsys.readouterr().out
    assert "Fill-mask predictions:" in printed and f" {mask} " in printed.split("Fill-mask predictions:")[1]
    assert Path(out / "README.md").exists()
    if "downstream" in config:
        assert "## Downstream" in (out / "README.md").read_text()
        assert json.loads((out / "downstream" / "downstream_results.json").read_text())["task"]["labels"]
