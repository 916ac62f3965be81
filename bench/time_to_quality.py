"""Time to quality: the reference trained for a time T against this project with only --max_train_time set.

    python bench/time_to_quality.py all --reference_steps 600          # prepare, reference, budgets, levers, table
    python bench/time_to_quality.py table                               # the tables again from the saved results

Work (data, models, results.json) goes to --work (default /tmp/time_to_quality); stages
can be run one by one (prepare, reference, budgets, levers, table) and are skipped when
their result is already saved.

- Data: this machine's Python docstrings (the built-in corpus), one line in 20 held out;
  a WordPiece tokenizer (8192, uncased) trained once on the training lines, used by every run.
- Model: BERT from a config, 4 layers, hidden 256, 4 heads, intermediate 1024, blocks of
  128 tokens, batch 32 (the quickstart's shape with the classic post-LayerNorm BERT).
- Reference: transformers' run_mlm.py as its users run it from scratch (the stock Trainer,
  DataCollatorForLanguageModeling, dense head, fp32 on a CPU), at reasonable from-scratch
  settings instead of its 5e-5 default: lr 5e-4, 6% warm-up, linear decay, for
  --reference_steps steps. Its training time is T.
- Project: `run_mlm.py` as a user types it, with the same model, tokenizer and text, and
  `--max_train_time` T/2, T/4, T/8, T/16, each with the recipe given by --recipe (default:
  the project's from-scratch defaults).
- Levers: at one budget (T/8), the reference's hyperparameters with one lever changed at a
  time (mask rate, dropout, learning rate, schedule, warm-up).
- Score: every saved model on the same held-out blocks with the same 15% masks (seeded,
  80/10/10), dense head in fp32: the mean loss over masked tokens and the accuracy.

The time-to-quality speedup is T divided by the smallest budget whose loss is at most the
reference's (">= 16x" when even T/16 is better).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SEQ, BATCH, VOCAB = 128, 32, 8192
MODEL = "num_hidden_layers=4,hidden_size=256,num_attention_heads=4,intermediate_size=1024,max_position_embeddings=128"
REFERENCE = {"learning_rate": 5e-4, "warmup_steps": 0.06, "lr_scheduler_type": "linear"}
# One lever at a time, on top of the reference's hyperparameters (run by the project at the lever budget).
LEVERS = {
    "reference hyperparameters": [],
    "mask 30%": ["--mlm_probability", "0.3"],
    "mask 40%": ["--mlm_probability", "0.4"],
    "dropout 0": ["--config_overrides", MODEL + ",hidden_dropout_prob=0,attention_probs_dropout_prob=0"],
    "lr 1e-3": ["--learning_rate", "1e-3"],
    "lr 2e-3": ["--learning_rate", "2e-3"],
    "warm-up 2%": ["--warmup_steps", "0.02"],
    "warm-up 12%": ["--warmup_steps", "0.12"],
    "wsd 1-sqrt (decay 20%)": ["--lr_scheduler_type", "warmup_stable_decay", "--lr_scheduler_kwargs",
                               '{"num_decay_steps": 0.2, "decay_type": "1-sqrt"}'],
    "triangle (warm-up 50%)": ["--warmup_steps", "0.5"],
}


def load_results(work: Path) -> dict:
    path = work / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save_result(work: Path, key: str, value: dict) -> None:
    results = load_results(work)
    results[key] = value
    (work / "results.json").write_text(json.dumps(results, indent=1))


# -- Data ---------------------------------------------------------------------------------------------


def prepare(work: Path) -> None:
    if (work / "tokenizer").exists():
        return
    from utils.data.corpus import build_corpus
    from utils.data.tokenizer import train_wordpiece_tokenizer

    lines = [line for line in build_corpus("python_docstrings").read_text(encoding="utf-8").splitlines() if line]
    train = [line for i, line in enumerate(lines) if i % 20]
    held_out = [line for i, line in enumerate(lines) if i % 20 == 0]
    work.mkdir(parents=True, exist_ok=True)
    (work / "train.txt").write_text("\n".join(train) + "\n", encoding="utf-8")
    (work / "eval.txt").write_text("\n".join(held_out) + "\n", encoding="utf-8")
    tokenizer = train_wordpiece_tokenizer(train, vocab_size=VOCAB, model_max_length=512)
    tokenizer.save_pretrained(work / "tokenizer")


# -- The reference ------------------------------------------------------------------------------------


def reference(work: Path, steps: int, seed: int) -> dict:
    """The stock Trainer and collator, dense head, fp32, lr 5e-4, 6% warm-up, linear decay."""
    import torch
    from datasets import Dataset
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForMaskedLM,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    from fixed_masks import text_blocks

    train = text_blocks(tokenizer, work / "train.txt", SEQ).numpy()  # as both scripts pack it
    special = torch.isin(torch.as_tensor(train), torch.tensor(tokenizer.all_special_ids)).to(torch.int8).numpy()
    # The reference's group_texts keeps every column the tokenizer returned.
    dataset = Dataset.from_dict({"input_ids": train, "token_type_ids": train * 0, "attention_mask": train * 0 + 1,
                                 "special_tokens_mask": special})
    torch.manual_seed(seed)
    pieces = dict(item.split("=") for item in MODEL.split(","))
    config = BertConfig(vocab_size=len(tokenizer), **{k: int(v) for k, v in pieces.items()})
    model = BertForMaskedLM(config)
    out = work / "reference"
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=BATCH, max_steps=steps, seed=seed,
                             logging_steps=50, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
                             **REFERENCE)
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15))
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    trainer.save_model(str(out))
    tokenizer.save_pretrained(out)
    return {"seconds": seconds, "steps": steps, "train_runtime": result.metrics["train_runtime"]}


# -- The project ------------------------------------------------------------------------------------


def project(work: Path, name: str, seconds: float, flags: list[str], seed: int) -> dict:
    """run_mlm.py as a user types it, for `seconds` of training; returns what it reported."""
    out = work / "runs" / name.replace(" ", "_").replace("/", "-").replace("%", "pct")
    command = [sys.executable, str(REPO / "run_mlm.py"), "--model_type", "bert", "--config_overrides", MODEL,
               "--tokenizer_name", str(work / "tokenizer"), "--train_file", str(work / "train.txt"),
               "--validation_file", str(work / "eval.txt"), "--max_seq_length", str(SEQ), "--do_train",
               "--output_dir", str(out), "--per_device_train_batch_size", str(BATCH),
               "--max_train_time", f"{seconds:.1f}s", "--logging_steps", "50", "--save_strategy", "no",
               "--report_to", "none", "--disable_tqdm", "true", "--seed", str(seed), *flags]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    metrics = json.loads((out / "train_results.json").read_text())
    return {"dir": str(out), "budget": seconds, "flags": flags, "wall": time.perf_counter() - started,
            "steps": json.loads((out / "trainer_state.json").read_text())["global_step"],
            "used": metrics["train_time_budget_used"]}


# -- The score ---------------------------------------------------------------------------------------


def score(work: Path, model_dir: str, seed: int = 1234) -> dict:
    """Masked-token loss and accuracy on the held-out blocks, with the same 15% masks for every model."""
    from fixed_masks import masked_scores, seeded_masks, text_blocks
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    ids = text_blocks(tokenizer, work / "eval.txt", SEQ)
    inputs, labels = seeded_masks(ids, tokenizer, seed)
    model = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    return {**masked_scores(model, inputs, labels), "blocks": len(ids)}


def fill_mask(model_dir: str) -> str:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from utils.tools.fill_mask import predict_masks

    sentence = "Return a new [MASK] with the same elements."
    model = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    predictions = predict_masks(model, AutoTokenizer.from_pretrained(model_dir), [sentence], 5)
    return ", ".join(p["token_str"].strip() for p in predictions[0][0])


# -- The tables ---------------------------------------------------------------------------------------


def print_tables(work: Path) -> None:
    from utils.train.precision import cpu_description

    results = load_results(work)
    ref = results.get("reference")
    print(f"CPU: {cpu_description()}; torch threads {os.cpu_count()}")
    if not ref:
        print("no reference yet")
        return
    T = ref["seconds"]
    print(f"\nReference: {ref['steps']} steps in {T:.0f} s (T); held-out loss {ref['loss']:.4f}, accuracy "
          f"{ref['accuracy']:.3f}; fill-mask: {ref.get('fill_mask', '')}")
    print("\n| run | budget | steps | held-out loss | accuracy | vs reference loss | fill-mask |")
    print("|---|---|---|---|---|---|---|")
    print(f"| reference | T = {T:.0f} s | {ref['steps']} | {ref['loss']:.4f} | {ref['accuracy']:.3f} | - | "
          f"{ref.get('fill_mask', '')} |")
    reached = []
    for key in sorted((k for k in results if k.startswith("budget ")), key=lambda k: -results[k]["budget"]):
        r = results[key]
        fraction = T / r["budget"]
        if r["loss"] <= ref["loss"]:
            reached.append(fraction)
        print(f"| {key} | T/{fraction:.0f} = {r['budget']:.0f} s | {r['steps']} | {r['loss']:.4f} | "
              f"{r['accuracy']:.3f} | {r['loss'] - ref['loss']:+.4f} | {r.get('fill_mask', '')} |")
    if reached:
        best = max(reached)
        smallest = max(T / results[k]["budget"] for k in results if k.startswith("budget "))
        print(f"\nTime-to-quality speedup: {'>= ' if best == smallest else ''}{best:.0f}x (the smallest budget at or "
              f"below the reference's loss is T/{best:.0f})")
    levers = {k[len("lever "):]: v for k, v in results.items() if k.startswith("lever ")}
    if levers:
        base = levers.get("reference hyperparameters")
        budget = next(iter(levers.values()))["budget"]
        print(f"\nLevers at equal wall-clock ({budget:.0f} s each, the reference's hyperparameters with one change):")
        print("\n| lever | steps | held-out loss | vs reference hyperparameters |")
        print("|---|---|---|---|")
        for name, r in levers.items():
            delta = f"{r['loss'] - base['loss']:+.4f}" if base else "-"
            print(f"| {name} | {r['steps']} | {r['loss']:.4f} | {delta} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["all", "prepare", "reference", "budgets", "levers", "table"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/time_to_quality"))
    parser.add_argument("--reference_steps", type=int, default=600)
    parser.add_argument("--fractions", default="2,4,8,16")
    parser.add_argument("--lever_fraction", type=float, default=8)
    parser.add_argument("--levers", default=",".join(LEVERS), help="comma-separated names from LEVERS")
    parser.add_argument("--recipe", default="", help="flags for the budget runs, e.g. '--learning_rate 1e-3'")
    parser.add_argument("--tag", default="", help="a suffix for the budget runs' names (several recipes)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    work = args.work
    stages = ["prepare", "reference", "budgets", "levers", "table"] if args.stage == "all" else [args.stage]
    prepare(work)  # every stage needs the data (made once)
    results = load_results(work)
    if "reference" in stages and "reference" not in results:
        ref = reference(work, args.reference_steps, args.seed)
        ref.update(score(work, str(work / "reference")), fill_mask=fill_mask(str(work / "reference")))
        save_result(work, "reference", ref)
        print(f"reference: {ref}", flush=True)
    T = load_results(work).get("reference", {}).get("seconds")
    if "budgets" in stages:
        for fraction in (float(f) for f in args.fractions.split(",")):
            key = f"budget T/{fraction:g}{args.tag}"
            if key in load_results(work):
                continue
            run = project(work, key, T / fraction, args.recipe.split(), args.seed)
            run.update(score(work, run["dir"]), fill_mask=fill_mask(run["dir"]))
            save_result(work, key, run)
            print(f"{key}: {run}", flush=True)
    if "levers" in stages:
        for name in args.levers.split(","):
            key = f"lever {name}"
            if key in load_results(work):
                continue
            # The reference's hyperparameters (none of the project's recipe), then the lever's change.
            flags = ["--scratch_recipe", "false"]
            for k, v in REFERENCE.items():
                flags += [f"--{k}", str(v)]
            run = project(work, key, T / args.lever_fraction, flags + LEVERS[name], args.seed)
            run.update(score(work, run["dir"]))
            save_result(work, key, run)
            print(f"{key}: {run}", flush=True)
    print_tables(work)


if __name__ == "__main__":
    main()
