"""A finished run stays finished, and a stopped-then-resumed run reports the whole run (issue #31)."""

import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest

from run_mlm import main
from utils.errors import RunError

from .conftest import REPO, tiny_run_args

FILL = ["--fill_mask_sentences", "the cat sees [MASK] red ball every morning ."]


def checksums(folder):
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_rerunning_a_finished_run_says_so_in_one_line_and_changes_nothing(corpus, tmp_path):
    out = tmp_path / "out"
    args = tiny_run_args(out, corpus, "--max_steps", "20", "--save_strategy", "steps", "--save_steps", "10", *FILL)
    first = subprocess.run([sys.executable, str(REPO / "run_mlm.py"), *args], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    before = checksums(out)
    again = subprocess.run([sys.executable, str(REPO / "run_mlm.py"), *args], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stderr.strip().splitlines()[-1] == (
        f"{out} already finished at step 20 (the model is saved there); nothing was changed. Use a new "
        "--output_dir to train again, or raise --max_steps to train on.")
    assert "Resuming" not in again.stderr and "'loss'" not in again.stdout
    assert checksums(out) == before

    # A larger --max_steps trains on from the last checkpoint.
    results = main(tiny_run_args(out, corpus, "--max_steps", "25", "--save_strategy", "steps", "--save_steps", "10"))
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 25
    assert results["train_segments"] == 2


def test_a_finished_time_budget_run_is_finished_until_the_budget_is_raised(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    budget = ["--max_steps", "0", "--save_strategy", "steps", "--save_steps", "5"]
    main(tiny_run_args(out, corpus, *budget, "--max_train_time", "3s"))
    before = checksums(out)
    assert main(tiny_run_args(out, corpus, *budget, "--max_train_time", "3s")) == {}
    assert "already finished at its time budget" in capsys.readouterr().err
    assert checksums(out) == before
    assert main(tiny_run_args(out, corpus, *budget, "--max_train_time", "5s"))["train_segments"] == 2


def test_an_interrupted_then_resumed_run_reports_the_whole_run(corpus, tmp_path, monkeypatch):
    from utils.train.signals import GracefulStop

    def args(out):
        return tiny_run_args(out, corpus, "--max_steps", "60", "--save_strategy", "steps", "--save_steps", "13",
                             "--save_total_limit", "1", "--logging_steps", "5", "--eval_strategy", "steps",
                             "--eval_steps", "30", "--eval_on_start", "true", *FILL)

    whole = main(args(tmp_path / "whole"))

    # Ctrl-C during step 26: the run saves checkpoint-26 and stops; the same command resumes.
    original = GracefulStop.on_step_end

    def interrupt_at_26(self, args_, state, control, **kwargs):
        if state.global_step == 26 and not getattr(self, "fired", False):
            self.fired = True
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, args_, state, control, **kwargs)

    out = tmp_path / "resumed"
    monkeypatch.setattr(GracefulStop, "on_step_end", interrupt_at_26)
    with pytest.raises(RunError, match="SIGINT at step 26"):
        main(args(out))
    monkeypatch.setattr(GracefulStop, "on_step_end", original)
    earlier = json.loads((out / "checkpoint-26" / "run_segments.json").read_text())
    resumed = main(args(out))

    # The same weights, so the same loss over the same 60 steps; the time of both segments.
    assert resumed["train_segments"] == 2 and whole["train_segments"] == 1
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-4)
    assert resumed["train_runtime"] > earlier["train_runtime"] > 0
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-4) and saved["train_segments"] == 2

    card, whole_card = (out / "README.md").read_text(), (tmp_path / "whole" / "README.md").read_text()
    assert "in 2 segments (stopped and resumed" in card and "segments" not in whole_card
    tokenizer_line = next(line for line in whole_card.splitlines() if line.startswith("- Tokenizer:"))
    assert tokenizer_line in card and "checkpoint" not in tokenizer_line  # not the deleted checkpoint-26
    assert not (out / "checkpoint-26").exists()  # save_total_limit removed it
    # The card shows the loss before training and the run's own fill-mask sentence with its answers.
    assert "Before training (step 0, `eval_on_start`): eval_loss" in card
    assert "print(fill('the cat sees [MASK] red ball every morning .'))" in card
    assert "- the cat sees [MASK] red ball every morning . -> " in card
    assert "capital of France" not in card
