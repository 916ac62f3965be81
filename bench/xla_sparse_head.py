"""The fixed-slot sparse MLM head on XLA against the dense head: step time, head time, compilations, loss.

    XLA_PYTHON=$(bash scripts/setup_xla_env.sh)
    PJRT_DEVICE=CPU $XLA_PYTHON bench/xla_sparse_head.py            # torch_xla's CPU backend
    PJRT_DEVICE=TPU $XLA_PYTHON bench/xla_sparse_head.py            # on a TPU VM

The bench model of train_throughput.py (BERT 6x384, vocabulary 30522, sequence 128, batch
16) on blocks of this machine's docstrings, masked at 15% with the cap of the slot head
(`--slots`, default: run_mlm's default for this block length). One XLA device, a bare loop:
forward, backward, AdamW, then `torch_xla.sync()`, on the same masked batches for every head.
Rounds alternate which head goes first. Printed per head: the median step time and its ratio
to the dense head, the head's own forward and backward (hidden states to loss) against the
dense head's, the graph compilations after warm-up (0: one graph for every step), and the
loss on the same weights and batch against the dense head's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train_throughput as bench  # noqa: E402  (bench/ is not a package)


def compilations() -> int:
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, nargs="*", default=None,
                        help="slot counts to compare with the dense head (default: run_mlm's default, and BERT's 20)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="steps per head per round")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    import torch_xla
    import torch_xla.core.xla_model as xm
    import torch_xla.runtime as xr
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from utils.data.masking import MLMCollator, default_max_predictions
    from utils.model.mlm_head import install_mlm_head

    device = torch_xla.device()
    default = default_max_predictions(bench.SEQ, bench.MLM_PROBABILITY)
    slot_counts = args.slots if args.slots else [default, 20]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        bench.prepare_data(data, n_eval=16)
        tokenizer = AutoTokenizer.from_pretrained(data / "tokenizer")
        train = load_from_disk(data / "train")
        rows = bench.BATCH
        # Masked once, on the CPU, capped at the smallest slot count so that every head sees the same labels.
        collator = MLMCollator(tokenizer=tokenizer, mlm_probability=bench.MLM_PROBABILITY, seed=args.seed,
                               max_predictions=min(slot_counts))
        batches = [collator.mask_batch(collator([train[j] for j in range(i * rows, (i + 1) * rows)]), i)
                   for i in range(args.steps)]
    print(collator.cap_report("train"))
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    heads = {"dense": None, **{f"slots-{k}": k for k in slot_counts}}
    models = {}
    for name, slots in heads.items():
        model = bench.build_model(args.seed)
        install_mlm_head(model, sparse=slots is not None, slots=slots)
        model.to(device).train()
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))

    def loss_of(name, batch):
        model, _ = models[name]
        return model(**batch, num_items_in_batch=(batch["labels"] != -100).sum()).loss

    # The same loss on the same weights and batch (before any step changes the weights; no dropout).
    with torch.no_grad():
        for model, _ in models.values():
            model.eval()
        losses = {name: float(loss_of(name, batches[0]).cpu()) for name in models}
        for model, _ in models.values():
            model.train()

    def step(name, batch):
        model, optimizer = models[name]
        loss_of(name, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch_xla.sync()

    for name in models:  # warm-up: the first steps compile
        for batch in batches[:3]:
            step(name, batch)
    xm.wait_device_ops()
    compiled_before = compilations()
    times = {name: [] for name in models}
    for round_ in range(args.rounds):
        order = list(models) if round_ % 2 == 0 else list(reversed(models))
        for name in order:
            start = time.perf_counter()
            for batch in batches:
                step(name, batch)
            xm.wait_device_ops()
            times[name].append((time.perf_counter() - start) / len(batches) * 1000)
    compiled_after = compilations() - compiled_before

    # The head alone: hidden states -> logits -> loss, forward and backward, dense rows against slot rows.
    head_times = {}
    hidden = torch.randn(rows, bench.SEQ, bench.HIDDEN, device=device, requires_grad=True)
    labels = batches[0]["labels"]
    from utils.model.loss import masked_lm_loss
    from utils.model.mlm_head import labelled_slots

    model = models["dense"][0]
    for name, slots in heads.items():
        def head_step(slots=slots):
            if slots is None:
                logits, targets = model.cls(hidden), labels
            else:
                positions, valid = labelled_slots(labels != -100, slots)
                picked = hidden.gather(1, positions[..., None].expand(-1, -1, bench.HIDDEN))
                logits, targets = model.cls(picked), labels.gather(1, positions).masked_fill(~valid, -100)
            masked_lm_loss(logits, targets).backward()
            torch_xla.sync()
        for _ in range(3):
            head_step()
        xm.wait_device_ops()
        start = time.perf_counter()
        for _ in range(10):
            head_step()
        xm.wait_device_ops()
        head_times[name] = (time.perf_counter() - start) / 10 * 1000

    base = statistics.median(times["dense"])
    print(f"XLA device: {xr.device_type()}, torch {torch.__version__}; BERT {bench.LAYERS}x{bench.HIDDEN}, vocab "
          f"{bench.VOCAB}, {rows} x {bench.SEQ} tokens, {bench.MLM_PROBABILITY:.0%} masked")
    print(f"compilations in the {args.rounds * args.steps * len(models)} timed steps: {compiled_after}")
    print("| head | step ms (median of rounds) | vs dense | head fwd+bwd ms | head vs dense | loss | loss - dense |")
    print("|---|---|---|---|---|---|---|")
    for name in models:
        step_ms = statistics.median(times[name])
        print(f"| {name} | {step_ms:.1f} ({', '.join(f'{t:.0f}' for t in times[name])}) | {base / step_ms:.2f}x | "
              f"{head_times[name]:.1f} | {head_times[name] / head_times['dense']:.2f} | {losses[name]:.6f} | "
              f"{losses[name] - losses['dense']:+.1e} |")


if __name__ == "__main__":
    main()
