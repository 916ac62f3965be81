"""Averaging the last weights (LAWA) and a batch-size ramp, at the equal wall-clock of time_to_quality.py's levers.

    python bench/weight_averaging.py --budget 156      # seconds: T/8 of the reference measured there
    python bench/weight_averaging.py --budget 156 --rescore   # the averages again from the saved runs

Same data, tokenizer, model and score as bench/time_to_quality.py (its `prepare` is reused;
the reference itself is not needed: every comparison here is inside this script).

- LAWA (Kaddour 2022): one run saves a checkpoint every --every steps; the score of the
  final weights is compared with the mean of the final weights and the last k - 1
  checkpoints' (k = 2, 4, 6), so both come from the very same run and time. Two schedules: the project's recipe
  (warm-up, stable, 1-sqrt decay to 0 at the deadline) and a constant rate after warm-up,
  for which averaging is meant to stand in for the decay.
- Batch-size ramp: the first --ramp_fraction of the budget at batch 8 (4x the optimizer
  steps per token), then batch 32, against batch 32 throughout. Made of two run_mlm.py
  calls: --max_steps ends the first at the ramp's end, the second resumes its checkpoint
  at batch 32 (the time-budget schedule goes on from the checkpoint's elapsed time).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import time_to_quality as ttq  # noqa: E402  (bench/ is not a package)


def average(models: list[Path], template: Path, out: Path) -> Path:
    """The element-wise mean of the models' weights, saved with `template`'s config and tokenizer."""
    import torch
    from safetensors.torch import load_file, save_file

    states = [load_file(str(m / "model.safetensors")) for m in models]
    mean = {k: torch.stack([s[k].float() for s in states]).mean(0).to(states[-1][k].dtype) for k in states[-1]}
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(template, out, ignore=shutil.ignore_patterns("*.pt", "*.pth", "rng_state*", "scheduler*",
                                                                 "optimizer*", "model.safetensors"))
    save_file(mean, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def lawa_scores(work: Path, out: Path, steps: int) -> dict:
    """The final weights, and the mean of them with the last k - 1 checkpoints' (k = 2, 4, 6)."""
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    result = {"steps": steps, "final": ttq.score(work, str(out))["loss"],
              "averaged": [c.name for c in checkpoints] + [f"final (step {steps})"]}
    for k in (2, 4, 6):
        if len(checkpoints) >= k - 1:
            models = [*checkpoints[len(checkpoints) - (k - 1):], out]
            result[f"last {k}"] = ttq.score(work, str(average(models, checkpoints[-1], out / f"lawa-{k}")))["loss"]
    return result


def lawa(work: Path, name: str, budget: float, every: int, flags: list[str], seed: int) -> dict:
    run = ttq.project(work, name, budget, ["--save_strategy", "steps", "--save_steps", str(every),
                                           "--save_total_limit", "5", *flags], seed)
    return lawa_scores(work, Path(run["dir"]), run["steps"])


def ramp(work: Path, budget: float, fraction: float, step_seconds: float, seed: int) -> dict:
    """Batch 8 for about `fraction` of the budget, then batch 32 to the deadline (one schedule over the budget)."""
    name = "ramp" if seed == 42 else f"ramp seed {seed}"
    out = work / "runs" / name.replace(" ", "_")
    if out.exists():
        shutil.rmtree(out)
    # A step at batch 8 takes about a third of one at 32 here; the fraction reached is measured, not assumed.
    first_steps = max(1, round(fraction * budget / (step_seconds / 3)))
    first = ttq.project(work, name, budget, ["--per_device_train_batch_size", "8", "--max_steps", str(first_steps),
                                               "--save_strategy", "steps", "--save_steps", str(first_steps)], seed)
    whole = ttq.project(work, name, budget, [], seed)
    runtime = json.loads((out / "train_results.json").read_text())["train_runtime"]
    return {"steps_at_8": first["steps"], "steps": whole["steps"], "fraction_at_8": first["used"] / budget,
            "runtime": runtime, "final": ttq.score(work, str(out))["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/time_to_quality"))
    parser.add_argument("--budget", type=float, required=True, help="seconds of training per run")
    parser.add_argument("--every", type=int, default=25, help="steps between the checkpoints LAWA averages")
    parser.add_argument("--ramp_fraction", type=float, default=0.25, help="of the budget at batch 8")
    parser.add_argument("--ramp_only", action="store_true", help="only the ramp and its baseline (another --seed)")
    parser.add_argument("--rescore", action="store_true", help="score the saved runs again (no training)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    ttq.prepare(args.work)
    saved = args.work / "weight_averaging.json"
    if args.rescore:
        results = json.loads(saved.read_text())
        for name in ("lawa recipe", "lawa constant"):
            out = args.work / "runs" / name.replace(" ", "_")
            results[name] = lawa_scores(args.work, out, results[name]["steps"])
        saved.write_text(json.dumps(results, indent=1))
        print_table(results, args)
        return
    if args.ramp_only:  # another seed of the ramp against its baseline
        suffix = f" seed {args.seed}"
        plain = ttq.project(args.work, "recipe batch 32" + suffix, args.budget, [], args.seed)
        results = {"plain": {"steps": plain["steps"], "final": ttq.score(args.work, plain["dir"])["loss"]}}
        results["ramp"] = ramp(args.work, args.budget, args.ramp_fraction, args.budget / plain["steps"], args.seed)
        (args.work / f"ramp_seed_{args.seed}.json").write_text(json.dumps(results, indent=1))
        r, base = results["ramp"], results["plain"]
        print(f"seed {args.seed}: batch 32 throughout {base['steps']} steps, loss {base['final']:.4f}; ramp "
              f"{r['steps_at_8']} steps at batch 8 ({r['fraction_at_8']:.0%}), {r['steps']} in all, loss "
              f"{r['final']:.4f} ({r['final'] - base['final']:+.4f})")
        return
    results = {}
    plain = ttq.project(args.work, "recipe batch 32", args.budget, [], args.seed)
    results["plain"] = {"steps": plain["steps"], "final": ttq.score(args.work, plain["dir"])["loss"]}
    print("plain", json.dumps(results["plain"]), flush=True)
    for name, flags in (("lawa recipe", []),
                        ("lawa constant", ["--lr_scheduler_type", "constant_with_warmup"])):
        results[name] = lawa(args.work, name, args.budget, args.every, flags, args.seed)
        print(name, json.dumps(results[name]), flush=True)
    results["ramp"] = ramp(args.work, args.budget, args.ramp_fraction, args.budget / plain["steps"], args.seed)
    print("ramp", json.dumps(results["ramp"]), flush=True)
    saved.write_text(json.dumps(results, indent=1))
    print_table(results, args)


def print_table(results: dict, args) -> None:
    base = results["plain"]["final"]
    print(f"\nEqual wall-clock ({args.budget:.0f} s per run); held-out loss on time_to_quality's blocks and masks. "
          f"The recipe at batch 32 without checkpoints: {results['plain']['steps']} steps, loss {base:.4f}.")
    print("\n| schedule | steps | final weights | mean of the final and the last checkpoint | final + last 3 | "
          "final + last 5 |")
    print("|---|---|---|---|---|---|")
    for name in ("lawa recipe", "lawa constant"):
        r = results[name]
        print(f"| {name[5:]} (a checkpoint every {args.every} steps) | {r['steps']} | {r['final']:.4f} | " +
              " | ".join(f"{r[f'last {k}']:.4f}" if f"last {k}" in r else "-" for k in (2, 4, 6)) + " |")
    r = results["ramp"]
    print(f"\nBatch ramp: {r['steps_at_8']} steps at batch 8 ({r['fraction_at_8']:.0%} of the budget), "
          f"then batch 32 to step {r['steps']}: loss {r['final']:.4f} ({r['final'] - base:+.4f} against batch 32 "
          f"throughout).")


if __name__ == "__main__":
    main()
