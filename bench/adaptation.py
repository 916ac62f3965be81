"""The adaptation recipe: which learning rate and mask rate to adapt a pretrained model to new text with.

    python bench/adaptation.py all                 # prepare, base, adapt, score, downstream, table
    python bench/adaptation.py table               # the table again from the saved results

Offline there is no hub checkpoint, so the "pretrained" model is made here, and the new
domain is text it never saw:

- Domain: the docstrings of the four standard-library packages of the built-in task
  python_packages (which package a paragraph comes from). The task's validation
  paragraphs are held out of everything the MLM trains on; they are also the held-out
  text the MLM loss is scored on.
- Base ("the pretrained checkpoint"): the quickstart's model (ModernBERT 4 x 256, WordPiece
  8192 uncased) pretrained from scratch with the project's recipe on every other docstring
  of the standard library, for --base_time.
- Adapted: the base trained on the domain text by run_mlm.py for --adapt_steps steps, with
  transformers' defaults for adaptation (linear decay, no warm-up, dropout as the model has
  it) and one (learning rate, training mask rate) pair of the grid each. Evaluation masks
  15% in every run.
- Scores: the held-out domain paragraphs with the same seeded 15% masks for every model
  (mean loss over masked tokens), and utils.tools.downstream on python_packages (the base is the
  baseline; the same seeds and fine-tuning hyperparameters for every model; paired
  differences, 95% CI and p-value against the base).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

SEQ = 128
MODEL = ("num_hidden_layers=4,hidden_size=256,num_attention_heads=4,intermediate_size=512,"
         "max_position_embeddings=128")
GRID = {  # name -> (learning rate, training mask rate)
    "lr 5e-5, mask 15% (transformers' defaults)": (5e-5, 0.15),
    "lr 5e-5, mask 30%": (5e-5, 0.30),
    "lr 2e-4, mask 15%": (2e-4, 0.15),
    "lr 2e-4, mask 30%": (2e-4, 0.30),
    "lr 5e-4, mask 15%": (5e-4, 0.15),
    "lr 5e-4, mask 30%": (5e-4, 0.30),
}
DOWNSTREAM = ["--learning_rate", "1e-4", "--num_train_epochs", "3", "--per_device_train_batch_size", "32"]


def load_results(work: Path) -> dict:
    path = work / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save_result(work: Path, key: str, value) -> None:
    results = load_results(work)
    results[key] = value
    (work / "results.json").write_text(json.dumps(results, indent=1))


def slug(name: str) -> str:
    return name.split(" (")[0].replace(", ", "_").replace(" ", "").replace("%", "pct")


def prepare(work: Path) -> None:
    """base.txt (other packages), domain.txt (the task's packages, minus the task's validation), domain_eval.txt."""
    if (work / "domain_eval.txt").exists():
        return
    from utils.data.corpus import build_labelled_task, iter_python_docstrings_by_file

    files = build_labelled_task("python_packages")
    with open(files["validation"][0], encoding="utf-8") as f:
        validation = list(csv.DictReader(f))
    with open(files["train"][0], encoding="utf-8") as f:
        packages = {row["label"] for row in csv.DictReader(f)}
    held_out = {row["text"] for row in validation}
    base, domain = [], []
    for relative, paragraph in iter_python_docstrings_by_file():
        in_domain = len(relative.parts) > 1 and relative.parts[0] in packages
        if paragraph not in held_out:
            (domain if in_domain else base).append(paragraph)
    base_eval = base[::20]
    base = [p for i, p in enumerate(base) if i % 20]
    work.mkdir(parents=True, exist_ok=True)
    for name, lines in (("base.txt", base), ("base_eval.txt", base_eval), ("domain.txt", domain),
                        ("domain_eval.txt", sorted(held_out))):
        (work / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"packages {sorted(packages)}; base {len(base)} paragraphs, domain {len(domain)}, "
          f"held-out domain {len(held_out)}", flush=True)


def run_mlm(flags: list[str], out: Path) -> dict:
    command = [sys.executable, str(REPO / "run_mlm.py"), "--output_dir", str(out), "--max_seq_length", str(SEQ),
               "--do_train", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
               "--logging_steps", "50", "--per_device_train_batch_size", "32", "--seed", "42", *flags]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{out.name} failed:\n{result.stderr[-3000:]}")
    metrics = json.loads((out / "train_results.json").read_text())
    return {"dir": str(out), "steps": json.loads((out / "trainer_state.json").read_text())["global_step"],
            "train_runtime": metrics["train_runtime"], "train_loss": metrics["train_loss"]}


def base(work: Path, seconds: str) -> dict:
    return run_mlm(["--model_type", "modernbert", "--config_overrides", MODEL, "--tokenizer_type", "wordpiece",
                    "--tokenizer_lowercase", "true", "--tokenizer_vocab_size", "8192",
                    "--train_file", str(work / "base.txt"), "--max_train_time", seconds], work / "base")


def adapt(work: Path, name: str, steps: int) -> dict:
    lr, rate = GRID[name]
    return run_mlm(["--model_name_or_path", str(work / "base"), "--train_file", str(work / "domain.txt"),
                    "--max_steps", str(steps), "--learning_rate", str(lr), "--mlm_probability", str(rate)],
                   work / "adapted" / slug(name))


def score(work: Path, model_dir: str, text: str = "domain_eval.txt", seed: int = 1234) -> float:
    """Mean loss over the seeded 15% masked tokens of the held-out text, packed into blocks of SEQ."""
    from fixed_masks import masked_scores, seeded_masks, text_blocks
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work / "base")
    inputs, labels = seeded_masks(text_blocks(tokenizer, work / text, SEQ), tokenizer, seed)
    return masked_scores(AutoModelForMaskedLM.from_pretrained(model_dir).eval(), inputs, labels)["loss"]


def downstream(work: Path, seeds: int) -> dict:
    models = [f"base={work / 'base'}"] + [f"{slug(name)}={work / 'adapted' / slug(name)}" for name in GRID]
    out = work / "downstream"
    command = [sys.executable, "-m", "utils.tools.downstream", "--models", *models, "--builtin_task", "python_packages",
               "--seeds", str(seeds), "--output_dir", str(out), "--report_to", "none", "--disable_tqdm", "true",
               *DOWNSTREAM]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"downstream failed:\n{result.stderr[-3000:]}")
    return json.loads((out / "downstream_results.json").read_text())


def print_table(work: Path) -> None:
    from utils.train.precision import cpu_description

    results = load_results(work)
    print(f"CPU: {cpu_description()}")
    if "base" not in results:
        print("no base yet")
        return
    b = results["base"]
    print(f"Base: {b['steps']} steps from scratch on the other packages' docstrings ({b['train_runtime']:.0f} s); "
          f"adapted: {results.get('adapt_steps', '?')} steps on the domain text each.")
    summary = results.get("downstream", {})
    print("\n| model | held-out domain MLM loss (15% masks) | other-packages MLM loss | downstream accuracy "
          "(mean ± sd) | vs base (paired mean, 95% CI) | p |")
    print("|---|---|---|---|---|---|")
    for name in ["base", *GRID]:
        key = "base" if name == "base" else f"adapt {name}"
        if key not in results:
            continue
        m = summary.get("base" if name == "base" else slug(name))
        accuracy = f"{m['accuracy_mean']:.4f} ± {m['accuracy_std']:.4f}" if m else "-"
        versus = (m or {}).get("vs_base", {}).get("accuracy")
        gain = (f"{versus['mean']:+.4f} [{versus['ci95'][0]:+.4f}, {versus['ci95'][1]:+.4f}]"
                if versus and versus["ci95"] else "-")
        p = f"{versus['p_value']:.3g}" if versus and versus["p_value"] is not None else "-"
        print(f"| {name} | {results[key]['domain_loss']:.4f} | {results[key]['base_loss']:.4f} | {accuracy} | "
              f"{gain} | {p} |")
    if summary:
        print(f"\nMajority class: {summary['task']['majority_accuracy']:.4f}; fine-tuning: {' '.join(DOWNSTREAM)}, "
              f"{len(summary['base']['per_seed'])} seeds.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["all", "table"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/adaptation"))
    parser.add_argument("--base_time", default="8m")
    parser.add_argument("--adapt_steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    work = args.work
    if args.stage == "all":
        prepare(work)
        if "base" not in load_results(work):
            run = base(work, args.base_time)
            run["domain_loss"] = score(work, run["dir"])
            run["base_loss"] = score(work, run["dir"], "base_eval.txt")
            save_result(work, "base", run)
            print(f"base: {run}", flush=True)
        save_result(work, "adapt_steps", args.adapt_steps)
        for name in GRID:
            if f"adapt {name}" not in load_results(work):
                run = adapt(work, name, args.adapt_steps)
                run["domain_loss"] = score(work, run["dir"])
                run["base_loss"] = score(work, run["dir"], "base_eval.txt")
                save_result(work, f"adapt {name}", run)
                print(f"{name}: {run}", flush=True)
        if "downstream" not in load_results(work):
            save_result(work, "downstream", downstream(work, args.seeds))
    print_table(work)


if __name__ == "__main__":
    main()
