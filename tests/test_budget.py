"""Training for a time budget (`--max_train_time`), and a separate masking rate for evaluation."""

import itertools
import json

import pytest
import torch

import utils.train.budget
from run_mlm import main
from utils.errors import UsageError
from utils.train.budget import parse_duration

from .conftest import REPO, accelerate_launch, tiny_run_args


@pytest.mark.parametrize("text, seconds", [("90m", 5400), ("2h", 7200), ("1h30m", 5400), ("45s", 45), ("3600", 3600),
                                           ("1.5h", 5400), ("10min", 600), (" 2H ", 7200)])
def test_durations_read_as_users_write_them(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["90x", "", "m", "1h 30", "0", "0m", "-5m", "1h30"])
def test_a_duration_that_is_not_one_is_refused_naming_the_flag(text):
    with pytest.raises(UsageError, match="--max_train_time"):
        parse_duration(text)


@pytest.fixture
def simulated_clock(monkeypatch):
    """Each reading of the budget's clock advances it by one second: step k ends at k seconds."""
    ticks = itertools.count(1)
    monkeypatch.setattr(utils.train.budget, "_now", lambda: float(next(ticks)))


def budget_run(out, corpus, *extra):
    return tiny_run_args(out, corpus, "--max_steps", "-1", "--max_train_time", "12s", "--warmup_steps", "0",
                         "--logging_steps", "1", "--learning_rate", "1e-3", *extra)


def logged(out, key):
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry[key] for entry in history if key in entry}


def test_schedule_reaches_zero_at_the_deadline_and_the_run_stops_there(simulated_clock, corpus, tmp_path):
    results = main(budget_run(tmp_path / "out", corpus))
    rates = logged(tmp_path / "out", "learning_rate")
    # Linear from 1e-3 to 0, each step's rate read at the middle of that step. Step 2's is set
    # when step 1 ends, before any step was timed: it keeps the starting rate.
    assert max(rates) == 12  # the deadline: 12 one-second steps
    assert rates.pop(1) == rates.pop(2) == 1e-3
    for step, rate in rates.items():
        assert rate == pytest.approx(1e-3 * (1 - (step - 0.5) / 12), abs=1e-9), step
    assert results["train_time_budget_reached"] is True and results["train_time_budget_used"] == 12
    used = logged(tmp_path / "out", "budget_used")
    assert used[6] == pytest.approx(0.5) and used[12] == 1.0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "linear schedule over the time budget" in card
    assert "- Time budget (--max_train_time): 0 min 12 s, 0 min 12 s used; stopped at the deadline." in card


def test_max_steps_before_the_deadline_ends_the_run_and_a_resume_goes_on_with_the_time_left(monkeypatch, corpus,
                                                                                            tmp_path):
    def clock():
        ticks = itertools.count(1)
        monkeypatch.setattr(utils.train.budget, "_now", lambda: float(next(ticks)))

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    clock()
    main(budget_run(whole, corpus))
    clock()
    first = main(budget_run(parts, corpus, "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "6"))
    assert first["train_time_budget_reached"] is False  # --max_steps came first
    assert json.loads((parts / "checkpoint-6" / "time_budget.json").read_text())["elapsed"] == 6
    clock()  # a new process: its clock starts again, the checkpoint says 6 s were used
    resumed = main(budget_run(parts, corpus))
    assert resumed["train_time_budget_reached"] is True and resumed["train_time_budget_used"] == 12
    for key in ("learning_rate", "loss"):
        assert logged(parts, key) == pytest.approx(logged(whole, key), rel=1e-6), key


def test_warmup_stable_decay_over_the_budget_with_its_decay_as_a_fraction(simulated_clock, corpus, tmp_path):
    main(budget_run(tmp_path / "out", corpus, "--warmup_steps", "0.25", "--lr_scheduler_type", "warmup_stable_decay",
                    "--lr_scheduler_kwargs", '{"num_decay_steps": 0.25, "decay_type": "1-sqrt"}'))
    rates = logged(tmp_path / "out", "learning_rate")
    assert max(rates) == 12
    # Each step's rate at its middle, (k - 0.5) s: warm-up over the first 3 s (steps 1 and 2 are
    # set before any step was timed, at 0 s), stable to 9 s, then 1-sqrt decay to 0 at 12 s.
    assert rates[1] == rates[2] == 0 and rates[3] == pytest.approx(1e-3 * 2.5 / 3)
    assert all(rates[step] == pytest.approx(1e-3) for step in range(4, 10))
    for step in (10, 11, 12):
        assert rates[step] == pytest.approx(1e-3 * (1 - ((step - 0.5 - 9) / 3) ** 0.5)), step


def test_a_decay_given_in_steps_under_a_budget_is_refused_naming_the_flag(corpus, tmp_path):
    with pytest.raises(UsageError, match="num_decay_steps 100: with --max_train_time"):
        main(budget_run(tmp_path / "out", corpus, "--lr_scheduler_type", "warmup_stable_decay",
                        "--lr_scheduler_kwargs", '{"num_decay_steps": 100}'))


def test_max_train_time_as_a_user_types_it(corpus, tmp_path):
    # The real clock: an hour's budget with --max_steps 8 ends at step 8.
    results = main(tiny_run_args(tmp_path / "out", corpus, "--max_steps", "8", "--max_train_time", "1h"))
    assert results["train_time_budget"] == 3600 and results["train_time_budget_reached"] is False
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["global_step"] == 8
    assert "ended before it" in (tmp_path / "out" / "README.md").read_text()


def test_a_bad_duration_stops_the_script_in_one_line(corpus, tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(REPO / "run_mlm.py"),
                             *tiny_run_args(tmp_path / "out", corpus, "--max_train_time", "90x")],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --max_train_time '90x' is not a duration")
    assert not (tmp_path / "out").exists()


def test_two_processes_with_different_clocks_agree_on_the_learning_rate_and_stop_after_the_same_step(corpus,
                                                                                                    tmp_path):
    # tests/skewed_clock.py: process 1's clock runs twice as fast as process 0's. The agreed
    # clock is the faster one (step k ends at 2k s), so a 12 s budget ends after step 6 on
    # both; going by its own clock, process 0 would train on alone to step 12 and hang.
    out = tmp_path / "out"
    args = budget_run(out, corpus)
    result = accelerate_launch("accelerate_configs/multi_cpu.yaml", [str(REPO / "run_mlm.py"), *args],
                               launcher_args=["--num_processes", "2"], timeout=240,
                               script=str(REPO / "tests" / "skewed_clock.py"))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    for rank in (0, 1):
        assert f"Process {rank} of 2, time budget: used 12 s of 12 s (100.0%) in 6 steps; stopped at the " \
               "deadline" in output, output[-3000:]
    rates = logged(out, "learning_rate")
    assert max(rates) == 6
    # The first clock all-reduce is read when step 2 ends: steps 1-3 keep the starting rate, and
    # from step 4 on both processes use the agreed clock's (each step's middle at 2k - 1 s).
    assert rates[1] == rates[2] == rates[3] == 1e-3
    for step in range(4, 7):
        assert rates[step] == pytest.approx(1e-3 * (1 - (2 * step - 1) / 12), abs=1e-9), step


def test_training_masks_at_its_rate_and_evaluation_at_15_percent(corpus, tmp_path):
    from transformers import AutoTokenizer

    from run_mlm import DataTrainingArguments
    from utils.data.masking import build_collator, mask_eval_dataset

    main(tiny_run_args(tmp_path / "out", corpus, "--max_steps", "1", "--do_eval", "false"))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    from datasets import Dataset

    ids = torch.randint(5, len(tokenizer), (400, 64))
    blocks = Dataset.from_dict({"input_ids": ids.tolist()})

    def rates(**flags):
        data_args = DataTrainingArguments(train_file=[str(corpus)], mlm_probability=0.3, **flags)
        collator = build_collator(tokenizer, data_args)
        collator.seed = 0
        train = collator.mask_batch(collator([{"input_ids": row} for row in ids.tolist()]), step=0)
        evaluation = torch.tensor(mask_eval_dataset(blocks, collator, seed=0)["labels"])
        return (train["labels"] != -100).float().mean().item(), (evaluation != -100).float().mean().item()

    train, evaluation = rates()
    assert train == pytest.approx(0.30, abs=0.01) and evaluation == pytest.approx(0.15, abs=0.01)
    assert rates(eval_mlm_probability=0.4)[1] == pytest.approx(0.40, abs=0.01)


def test_eval_mlm_probability_end_to_end_is_on_the_card(corpus, tmp_path):
    results = main(tiny_run_args(tmp_path / "out", corpus, "--max_steps", "4", "--mlm_probability", "0.3",
                                 "--eval_mlm_probability", "0.2"))
    assert results["eval_loss"] > 0
    assert "- Masking: 30% of tokens in training, 20% in evaluation" in (tmp_path / "out" / "README.md").read_text()


def test_eval_mlm_probability_out_of_range_is_refused():
    from run_mlm import DataTrainingArguments

    with pytest.raises(UsageError, match="--eval_mlm_probability 1.5 must be between 0 and 1"):
        DataTrainingArguments(builtin_corpus="python_docstrings", eval_mlm_probability=1.5)
