"""One CPU lever on and off, interleaved in one process: a bare training loop, less noisy than the Trainer table.

    python bench/lever_ab.py --lever last-layer                    # fp32
    python bench/lever_ab.py --lever last-layer --precision bf16   # bf16 autocast
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python bench/lever_ab.py --lever last-layer   # an AMX box as one without

The bench model of train_throughput.py (BERT 6x384, seq 128, batch 16) with the project's
defaults, built twice from the same seed: once with the lever, once without. Each step is
forward, backward, gradient clipping and fused AdamW on the same masked batches of this
machine's docstrings. Rounds alternate which model goes first, so a slow period of a noisy
machine falls on both; the result is the median step time of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_throughput as bench  # noqa: E402  (bench/ is not a package)

# lever -> which argument of install_mlm_head or speed_up_for_cpu turns it off
LEVERS = {
    "last-layer": ("head", "last_layer"),
    "tied-gradient": ("cpu", "tied_gradient"),
    "dropout": ("cpu", "dropout"),
    "attention": ("cpu", "attention"),
}


def build(lever_on: bool, lever: str, seed: int):
    import torch

    from utils.model.cpu import speed_up_for_cpu
    from utils.model.mlm_head import install_mlm_head

    where, argument = LEVERS[lever]
    model = bench.build_model(seed)
    install_mlm_head(model, **({argument: lever_on} if where == "head" else {}))
    speed_up_for_cpu(model, **({argument: lever_on} if where == "cpu" else {}))
    model.train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lever", choices=list(LEVERS), required=True)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10, help="steps per model per round")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer, TrainingArguments

    from utils.data.masking import build_collator
    from utils.train.precision import cpu_description

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        bench.prepare_data(data, n_eval=16)
        tokenizer = AutoTokenizer.from_pretrained(data / "tokenizer")
        train = load_from_disk(data / "train")
        masking = SimpleNamespace(mlm_probability=bench.MLM_PROBABILITY, mask_replace_prob=0.8,
                                  random_replace_prob=0.1, whole_word_mask=False, pad_to_multiple_of=None)
        collator = build_collator(tokenizer, masking, TrainingArguments(output_dir=tmp, use_cpu=True, seed=args.seed))
        rows = bench.BATCH
        batches = [collator.mask_batch(collator([train[j] for j in range(i * rows, (i + 1) * rows)]), i)
                   for i in range(args.steps)]
    models = {"on": build(True, args.lever, args.seed), "off": build(False, args.lever, args.seed)}

    def step(name, batch):
        model, optimizer = models[name]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = model(**batch, num_items_in_batch=int((batch["labels"] != -100).sum())).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for name in models:  # warm-up
        for batch in batches[:3]:
            step(name, batch)
    times = {name: [] for name in models}
    for round_ in range(args.rounds):
        for name in ("on", "off") if round_ % 2 == 0 else ("off", "on"):
            start = time.perf_counter()
            for batch in batches:
                step(name, batch)
            times[name].append((time.perf_counter() - start) / len(batches) * 1000)
    on, off = (statistics.median(times[name]) for name in ("on", "off"))
    faster = sum(a < b for a, b in zip(times["on"], times["off"]))
    print(f"CPU: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads; {args.precision}")
    print(f"ms per step, {args.rounds} rounds of {args.steps} steps: with {args.lever} "
          f"{[round(t) for t in times['on']]}, without {[round(t) for t in times['off']]}")
    print(f"median {on:.1f} ms with, {off:.1f} without: {off / on:.3f}x with the lever, faster in {faster} of "
          f"{args.rounds} rounds")


if __name__ == "__main__":
    main()
