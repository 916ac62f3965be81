"""Runs through the real launcher: `accelerate launch --config_file accelerate_configs/cpu.yaml run_mlm.py ...`."""

import json
from pathlib import Path

from .conftest import accelerate_launch, tiny_run_args


def test_cpu_config_trains_evaluates_and_saves(corpus, tmp_path):
    out = tmp_path / "out"
    result = accelerate_launch("accelerate_configs/cpu.yaml", tiny_run_args(out, corpus, "--max_steps", "20"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Process rank 0 of 1, device cpu, mixed precision no" in result.stdout
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_loss"] < 4.6 and results["train_samples"] > 0
    assert (out / "model.safetensors").exists()
    # The card's recorded command is the one that was typed, launcher included (issue #31).
    card = (out / "README.md").read_text()
    assert f"accelerate launch --config_file {Path(__file__).parent.parent / 'accelerate_configs/cpu.yaml'} " \
           "run_mlm.py --model_type bert" in card


def test_launcher_reports_bad_input_in_one_line(corpus, tmp_path):
    result = accelerate_launch("accelerate_configs/cpu.yaml",
                               tiny_run_args(tmp_path / "out", Path(corpus).with_suffix(".docx")))
    assert result.returncode != 0
    assert "error: --train_file" in result.stderr and "unsupported extension .docx" in result.stderr
    assert "Traceback" not in result.stderr.split("error: --train_file")[0]
    assert not (tmp_path / "out").exists()
