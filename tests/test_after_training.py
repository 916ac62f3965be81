"""What a run leaves for people: fill-mask CLI, loss plot, TensorBoard scalars, model card."""

import json
import subprocess
import sys

import pytest

from run_mlm import main

from .conftest import REPO, tiny_run_args


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus):
    """A tiny run with TensorBoard on (as by default) and evaluations along the way."""
    out = tmp_path_factory.mktemp("after") / "out"
    args = tiny_run_args(out, corpus, "--eval_strategy", "steps", "--eval_steps", "20")
    args.remove("--report_to")
    args.remove("none")  # not mentioned: TensorBoard is on by default when installed
    metrics = main(args)
    return out, metrics


def fill_mask(*args):
    return subprocess.run([sys.executable, "-m", "utils.tools.fill_mask", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def parse_predictions(stdout: str) -> list[list[tuple[str, float]]]:
    """[(token, score), ...] per printed prediction line."""
    rows = []
    for line in stdout.splitlines():
        if line.startswith("  "):
            pairs = line.split(": ", 1)[-1] if "mask " in line else line.split("-> ", 1)[-1]
            rows.append([(p.rsplit(" (", 1)[0], float(p.rsplit(" (", 1)[1].rstrip(")"))) for p in pairs.split(", ")])
    return rows


def test_fill_mask_cli_prints_ranked_probabilities(run):
    out, _ = run
    result = fill_mask(out, "the cat sees the [MASK] ball every morning .", "--top_k", "4")
    assert result.returncode == 0, result.stderr
    (predictions,) = parse_predictions(result.stdout)
    scores = [score for _, score in predictions]
    assert len(scores) == 4 and scores == sorted(scores, reverse=True) and sum(scores) <= 1 + 1e-6


def test_fill_mask_cli_adapts_the_mask_and_reads_files(run, tmp_path):
    out, _ = run
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("a <mask> bird\n\nthe [MASK] sees the [MASK] .\n")
    result = fill_mask(out, "--file", sentences)
    assert result.returncode == 0, result.stderr
    assert "a <mask> bird\n  -> " in result.stdout
    assert "mask 1: " in result.stdout and "mask 2: " in result.stdout
    assert len(parse_predictions(result.stdout)) == 3  # one line per mask


def test_fill_mask_cli_errors_are_one_line(run, tmp_path):
    out, _ = run
    result = fill_mask(out, "no mask here")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: no mask in 'no mask here': write [MASK] or <mask> where a word should " \
                                    "be predicted"
    missing = fill_mask(tmp_path / "nothing", "a [MASK]")
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr


def test_loss_plot_is_written_and_can_be_redrawn(run, tmp_path):
    from PIL import Image

    out, _ = run
    plot = out / "loss_curve.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.stat().st_size > 20_000  # axes, two curves and labels, not an empty canvas
    assert Image.open(plot).size[0] >= 800
    # Runnable on any past run, to another file.
    result = subprocess.run([sys.executable, "-m", "utils.tools.plot_metrics", str(out),
                             "--out", str(tmp_path / "p.png")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and (tmp_path / "p.png").stat().st_size > 20_000
    empty = subprocess.run([sys.executable, "-m", "utils.tools.plot_metrics", str(tmp_path)], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert empty.returncode == 2 and "has no trainer_state.json" in empty.stderr


def test_loss_plot_has_a_tokens_axis_and_leaves_the_backend_alone(run):
    import matplotlib

    from utils.tools.plot_metrics import draw_run, find_trainer_state, plot_run, read_history

    out, _ = run
    assert read_history(find_trainer_state(out))["tokens_per_step"] == 16 * 32  # batch x block length
    figure = draw_run(out)
    labels = [axis.get_xlabel() for parent in figure.axes for axis in (parent, *parent.child_axes)]
    assert "tokens seen" in labels and "optimizer step" in labels
    # Drawing does not switch the process's backend (a notebook's inline plots keep working).
    previous = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        plot_run(out)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(previous)


def test_tensorboard_logs_tokens_per_second_and_accuracy(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = run
    event_files = list((out / "runs").rglob("events.out.tfevents.*"))
    assert event_files
    tags = set()
    for event_file in event_files:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/tokens_per_second", "train/tokens_seen", "eval/loss", "eval/accuracy"} <= tags


def test_tokens_seen_and_rate_reach_the_trainer_state(run):
    out, _ = run
    state = json.loads((out / "trainer_state.json").read_text())
    train_logs = [e for e in state["log_history"] if "loss" in e]
    # Global batch 16 x 32 tokens per step.
    assert [e["tokens_seen"] for e in train_logs] == [e["step"] * 16 * 32 for e in train_logs]
    assert all(e["tokens_per_second"] > 0 for e in train_logs[1:])


def test_model_card_reports_the_run(run):
    out, metrics = run
    card = (out / "README.md").read_text()
    results = json.loads((out / "all_results.json").read_text())
    for key in ("eval_loss", "perplexity", "eval_accuracy"):
        assert f"{results[key]:.4f}" in card, key
    assert "Tokens seen: 30,720 (packed blocks)" in card  # 60 steps x 16 x 32
    assert "Training time: " in card
    assert "![Train and eval loss, learning rate](loss_curve.png)" in card
    assert "python run_mlm.py" in card and "run_args.yaml" in card
