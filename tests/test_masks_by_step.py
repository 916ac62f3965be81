"""Training masks are a function of (seed, optimizer step, row of the global batch): not of the data loader.

Masks are drawn on the main process when the Trainer gathers a step's batches
(`MLMTrainer.get_batch_samples`), so dataloader workers, a short last accumulation at
an epoch end and a resume all leave them unchanged.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from run_mlm import main

from .conftest import tiny_run_args


def logged_losses(output_dir):
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def weights(output_dir):
    return load_file(str(output_dir / "model.safetensors"))


def test_masks_do_not_depend_on_dataloader_workers(corpus, tmp_path):
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"workers{workers}"
        runs[workers] = main(tiny_run_args(out, corpus, "--max_steps", "8", "--logging_steps", "1",
                                           "--dataloader_num_workers", str(workers)))
    assert logged_losses(tmp_path / "workers0") == pytest.approx(logged_losses(tmp_path / "workers2"), abs=1e-6)
    assert runs[0]["eval_loss"] == pytest.approx(runs[2]["eval_loss"], abs=1e-6)
    first, second = weights(tmp_path / "workers0"), weights(tmp_path / "workers2")
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_a_resumed_run_with_workers_equals_an_uninterrupted_one(corpus, tmp_path):
    import shutil

    args = ["--max_steps", "12", "--logging_steps", "1", "--dataloader_num_workers", "2",
            "--save_strategy", "steps", "--save_steps", "6"]
    whole = main(tiny_run_args(tmp_path / "whole", corpus, *args))
    # The same command in a directory that holds only the first checkpoint: it resumes from step 6.
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-6", tmp_path / "resumed" / "checkpoint-6")
    resumed = main(tiny_run_args(tmp_path / "resumed", corpus, *args))
    # Steps 7-12, the ones the resumed process trained (steps 1-6 come from the copied
    # checkpoint's log, so comparing them would compare the whole run with itself).
    def later(run):
        return {step: loss for step, loss in logged_losses(tmp_path / run).items() if step > 6}

    assert sorted(later("resumed")) == list(range(7, 13))
    assert later("resumed") == pytest.approx(later("whole"), abs=1e-6)
    assert resumed["eval_loss"] == pytest.approx(whole["eval_loss"], abs=1e-6)
    first, second = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert all(torch.allclose(first[name], second[name], atol=1e-6) for name in first)
