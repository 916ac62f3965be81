"""A picture of a run: train and eval loss, and the learning rate, against steps and tokens seen.

    python -m utils.tools.plot_metrics OUTPUT_DIR            # writes OUTPUT_DIR/loss_curve.png
    python -m utils.tools.plot_metrics OUTPUT_DIR --out x.png

Reads `trainer_state.json` (in the output directory, or its newest checkpoint). run_mlm.py
writes the plot at the end of every run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from utils.errors import UsageError, exit_on_usage_error

PLOT_FILE = "loss_curve.png"


def find_trainer_state(run_dir: Path) -> Path:
    """trainer_state.json of a run: the final one, else the newest checkpoint's."""
    state = run_dir / "trainer_state.json"
    if state.exists():
        return state
    checkpoints = sorted(run_dir.glob("checkpoint-*/trainer_state.json"),
                         key=lambda p: int(p.parent.name.split("-")[1]))
    if not checkpoints:
        raise UsageError(f"{run_dir} has no trainer_state.json (is it a run's --output_dir?)")
    return checkpoints[-1]


def read_history(state_file: Path) -> dict:
    """The logged series: train loss, eval loss, learning rate (as (step, value) lists) and tokens per step."""
    state = json.loads(state_file.read_text(encoding="utf-8"))
    series = {"loss": [], "eval_loss": [], "learning_rate": []}
    tokens = []
    for entry in state.get("log_history", []):
        for key in series:
            if key in entry:
                series[key].append((entry["step"], entry[key]))
        # run_mlm logs `tokens_seen` (utils.train.callbacks.ThroughputCallback); the Trainer's own
        # counter (--include_num_input_tokens_seen) is `num_input_tokens_seen`.
        seen = entry.get("tokens_seen", entry.get("num_input_tokens_seen"))
        if seen is not None and entry.get("step"):
            tokens.append((entry["step"], seen))
    series["tokens_per_step"] = tokens[-1][1] / tokens[-1][0] if tokens else None
    return series


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the loss-curve PNG of the run in `run_dir`; returns its path."""
    out = Path(out) if out else Path(run_dir) / PLOT_FILE
    draw_run(run_dir).savefig(out, dpi=110)
    return out


def draw_run(run_dir: str | Path):
    """The loss-curve figure of the run in `run_dir` (a matplotlib Figure, not shown anywhere)."""
    # A Figure drawn by the Agg canvas directly: no pyplot, so the process's matplotlib
    # backend (a notebook's inline plots) is left as it was.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    series = read_history(find_trainer_state(run_dir))
    if not series["loss"] and not series["eval_loss"]:
        raise UsageError(f"{run_dir}: the trainer state logged no loss yet (raise --logging_steps frequency)")
    figure = Figure(figsize=(8, 6.5))
    FigureCanvasAgg(figure)
    loss_axis, lr_axis = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    if series["loss"]:
        loss_axis.plot(*zip(*series["loss"]), label="train loss", color="tab:blue", linewidth=1.2)
    if series["eval_loss"]:
        loss_axis.plot(*zip(*series["eval_loss"]), "o-", label="eval loss", color="tab:orange", markersize=4)
    loss_axis.set_ylabel("MLM loss (nats)")
    loss_axis.set_title(f"{run_dir.resolve().name}: masked-LM loss")
    loss_axis.grid(alpha=0.3)
    loss_axis.legend()
    if series["learning_rate"]:
        lr_axis.plot(*zip(*series["learning_rate"]), color="tab:green", linewidth=1.2)
    lr_axis.set_ylabel("learning rate")
    lr_axis.set_xlabel("optimizer step")
    lr_axis.grid(alpha=0.3)
    per_step = series["tokens_per_step"]
    if per_step:
        # A second x axis in tokens seen, on top of the loss plot.
        tokens_axis = loss_axis.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
        tokens_axis.set_xlabel("tokens seen")
    figure.tight_layout()
    return figure


@exit_on_usage_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run's --output_dir")
    parser.add_argument("--out", help=f"where to write the PNG (default: RUN_DIR/{PLOT_FILE})")
    args = parser.parse_args(argv)
    if not Path(args.run_dir).is_dir():
        raise UsageError(f"{args.run_dir} is not a directory")
    print(plot_run(args.run_dir, args.out))


if __name__ == "__main__":
    sys.exit(main())
