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


def test_readme_time_budget_recipe_runs_as_typed(tmp_path):
    # README, "Train for a time budget": the quickstart with --max_steps -1 --max_train_time
    # --warmup_steps 0.06 (a fraction of the budget), shortened to 20 seconds.
    out = tmp_path / "out"
    metrics = main([str(REPO / "configs" / "quickstart.yaml"), "--max_steps", "-1", "--max_train_time", "20s",
                    "--warmup_steps", "0.06", "--output_dir", str(out), "--eval_strategy", "no",
                    "--max_eval_samples", "32", "--logging_steps", "2", "--save_strategy", "no", "--report_to", "none",
                    "--disable_tqdm", "true"])
    assert metrics["train_time_budget_reached"] is True and 18 <= metrics["train_time_budget_used"] <= 22
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    rates = [entry["learning_rate"] for entry in history if "learning_rate" in entry]
    peak = max(rates)
    assert peak == pytest.approx(1e-3, rel=0.3) and rates[-1] < 0.2 * peak  # warmed up, then decayed to ~0
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert losses[-1] < losses[0] - 0.5
