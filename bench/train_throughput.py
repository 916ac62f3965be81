"""Training and evaluation throughput: the reference configuration against this project's defaults.

    python bench/train_throughput.py                 # the table (a few minutes on 2 CPU cores)
    python bench/train_throughput.py --loss_steps 200   # plus the 200-step loss-curve comparison

Model (built from a config, no hub): BERT, 6 layers, hidden 384, 12 heads, intermediate
1536, vocabulary 30522, sequence 128, batch 16, on blocks of this machine's Python
docstrings. Each configuration runs in its own process (so peak RSS is its own) on the
same data, with the same seed and number of steps:

- reference: what the reference run_mlm.py does with its defaults: dense MLM head over
  every position, fp32, the default attention (SDPA), transformers' default optimizer,
  the stock collator on the reference's four stored columns, and accuracy from argmax
  predictions stored for the whole evaluation set.
- reference+bf16: the same with bf16 autocast (a same-precision comparison).
- then this project's levers one at a time, ending with its defaults (sparse head, bf16
  where a bf16 matmul beats fp32 on this CPU, counts for accuracy) and the opt-in
  torch_compile. Both precisions are shown, so a table says what kind of CPU it ran on (the
  CPU line names its bf16 units; ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 keeps an AMX CPU's
  matmuls off AMX, to measure the other class on the same box).

MFU = achieved FLOP/s / the bf16 (and fp32) matmul peak measured on this machine in the
same run. FLOPs per token = 6 N_nonembedding + 12 L d T + 6 (d^2 + d V) p, p = 1 for a
dense head, p = the masked fraction for a sparse one; with the last layer on masked
positions only, that layer's queries, output, feed-forward and attention count at p too
(its keys and values at 1): the FLOPs the model needs, not the ones an implementation spends.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LAYERS, HIDDEN, HEADS, INTERMEDIATE, VOCAB, SEQ, BATCH = 6, 384, 12, 1536, 30522, 128, 16
MLM_PROBABILITY = 0.15

# name -> (description, settings)
CONFIGS = {
    "reference": ("reference: dense head, fp32", dict(project=False, bf16=False)),
    "reference+bf16": ("reference + bf16 autocast", dict(project=False, bf16=True)),
    "dense-fp32": ("project pipeline, dense head, fp32", dict(project=True, sparse=False, precision="fp32")),
    "sparse-fp32": ("project pipeline, sparse head, fp32", dict(project=True, sparse=True, precision="fp32")),
    "dense-bf16": ("project pipeline, dense head, bf16", dict(project=True, sparse=False, precision="bf16")),
    "sparse-bf16": ("project pipeline, sparse head, bf16", dict(project=True, sparse=True, precision="bf16")),
    "no-cpu-kernels": ("project defaults without the CPU speed-ups (dropout, attention, tied gradient, memory reuse)",
                       dict(project=True, sparse=True, precision="auto", cpu_kernels=False)),
    "torch-dropout": ("project defaults with torch's dropout masks", dict(project=True, sparse=True,
                                                                        precision="auto", dropout=False)),
    "sdpa-attention": ("project defaults with SDPA attention while training",
                       dict(project=True, sparse=True, precision="auto", attention=False)),
    "untied-gradient": ("project defaults with autograd's sum of the tied embedding's two gradients",
                        dict(project=True, sparse=True, precision="auto", tied_gradient=False)),
    "full-last-layer": ("project defaults with the last layer on every position",
                        dict(project=True, sparse=True, precision="auto", last_layer=False)),
    "glibc-malloc": ("project defaults with glibc's malloc returning freed memory",
                     dict(project=True, sparse=True, precision="auto", reuse_memory=False)),
    "project": ("project defaults: sparse head, precision auto", dict(project=True, sparse=True, precision="auto")),
    "project+compile": ("project defaults + --torch_compile", dict(project=True, sparse=True, precision="auto",
                                                                   compile=True)),
}


def flops_per_token(masked_fraction: float, last_layer_fraction: float = 1.0) -> float:
    """Training FLOPs per token; the head runs on `masked_fraction` of positions, the last layer's queries on
    `last_layer_fraction`."""
    full_layers = LAYERS - 1 + last_layer_fraction
    n_nonembedding = full_layers * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * INTERMEDIATE) + LAYERS * 2 * HIDDEN * HIDDEN
    head = HIDDEN * HIDDEN + HIDDEN * VOCAB
    return 6 * n_nonembedding + 12 * full_layers * HIDDEN * SEQ + 6 * head * masked_fraction


def matmul_peak(dtype_name: str, sizes=(1024, 2048, 3072), seconds: float = 1.0) -> float:
    """Best FLOP/s of square matmuls in this process (the machine's practical peak).

    Each size runs for `seconds` first: the matrix units of this CPU take a moment to reach
    full speed, and a short measurement once came out at less than half the peak.
    """
    import torch

    dtype = getattr(torch, dtype_name)
    best_rate = 0.0
    for size in sizes:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            a @ b
        for _ in range(10):
            start = time.perf_counter()
            a @ b
            best_rate = max(best_rate, 2 * size**3 / (time.perf_counter() - start))
    return best_rate


def model_gemm_rate(dtype_name: str, masked_fraction: float = MLM_PROBABILITY, repeats: int = 5) -> float:
    """FLOP/s of one training step's matrix products alone, at the model's own shapes.

    Forward and backward products of every layer (Q, K, V, output, FFN up and down,
    attention scores and values) and of a sparse head, timed back to back with nothing
    else: the best MFU any implementation of this model shape could reach on this machine.
    """
    import torch

    dtype, tokens, heads = getattr(torch, dtype_name), BATCH * SEQ, BATCH * HEADS
    head_dim, masked = HIDDEN // HEADS, round(BATCH * SEQ * masked_fraction)
    masked_per_row = masked // BATCH

    def linear(m, k, n):  # y = x w^T; backward dx = dy w, dw = dy^T x
        x, w, dy = (torch.randn(*s, dtype=dtype) for s in ((m, k), (n, k), (m, n)))
        return [lambda: x @ w.t(), lambda: dy @ w, lambda: dy.t() @ x]

    def batched(b, m, k, n):  # y = a c; backward da = dy c^T, dc = a^T dy
        a, c, dy = (torch.randn(*s, dtype=dtype) for s in ((b, m, k), (b, k, n), (b, m, n)))
        return [lambda: a @ c, lambda: dy @ c.transpose(1, 2), lambda: a.transpose(1, 2) @ dy]

    layer = (linear(tokens, HIDDEN, HIDDEN) * 4 + linear(tokens, HIDDEN, INTERMEDIATE)
             + linear(tokens, INTERMEDIATE, HIDDEN) + batched(heads, SEQ, head_dim, SEQ)
             + batched(heads, SEQ, SEQ, head_dim))
    # The last layer: keys and values everywhere, the rest at the masked positions.
    last = (linear(tokens, HIDDEN, HIDDEN) * 2 + linear(masked, HIDDEN, HIDDEN) * 2
            + linear(masked, HIDDEN, INTERMEDIATE) + linear(masked, INTERMEDIATE, HIDDEN)
            + batched(heads, masked_per_row, head_dim, SEQ) + batched(heads, masked_per_row, SEQ, head_dim))
    head = linear(masked, HIDDEN, HIDDEN) + linear(masked, HIDDEN, VOCAB)
    flops = flops_per_token(masked / tokens, masked / tokens) * tokens
    calls = layer * (LAYERS - 1) + last + head
    for call in layer + last + head:
        call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for call in calls:
            call()
        best = min(best, time.perf_counter() - start)
    return flops / best


def prepare_data(directory: Path, n_eval: int) -> None:
    """Blocks of 128 tokens from the docstring corpus, saved for the children (reference and project columns)."""
    import numpy as np
    from datasets import Dataset

    from utils.data.corpus import build_corpus
    from utils.data.tokenizer import train_wordpiece_tokenizer

    lines = [line for line in build_corpus("python_docstrings").read_text(encoding="utf-8").splitlines() if line]
    tokenizer = train_wordpiece_tokenizer(lines, vocab_size=VOCAB, model_max_length=512)
    tokenizer.save_pretrained(directory / "tokenizer")
    ids = np.concatenate([np.asarray(x, dtype=np.int64) for x in tokenizer(lines)["input_ids"]])
    blocks = ids[: len(ids) // SEQ * SEQ].reshape(-1, SEQ)
    special = np.isin(blocks, tokenizer.all_special_ids).astype(np.int8)
    eval_blocks, train_blocks = blocks[:n_eval], blocks[n_eval:]
    Dataset.from_dict({"input_ids": train_blocks}).save_to_disk(directory / "train")
    Dataset.from_dict({"input_ids": eval_blocks}).save_to_disk(directory / "eval")
    # The reference stores four columns per token (its group_texts keeps what the tokenizer returned).
    splits = (("train_ref", train_blocks, special[n_eval:]), ("eval_ref", eval_blocks, special[:n_eval]))
    for name, part, mask in splits:
        Dataset.from_dict({"input_ids": part, "token_type_ids": np.zeros_like(part),
                           "attention_mask": np.ones_like(part), "special_tokens_mask": mask}).save_to_disk(
            directory / name)


def build_model(seed: int):
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        intermediate_size=INTERMEDIATE, max_position_embeddings=512)
    return BertForMaskedLM(config)


class StepTimer:
    """Wall-clock time at the end of every training step, and the logged losses."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                timer.times.append(time.perf_counter())

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    timer.losses.append((state.global_step, logs["loss"]))

        self.times: list[float] = []
        self.losses: list[tuple[int, float]] = []
        self.callback = Callback()


def run_child(name: str, data: Path, steps: int, warmup: int, seed: int, logging_steps: int) -> dict:
    """Train `warmup + steps` steps and evaluate twice in this process; report speed, memory and losses."""
    import numpy as np
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    settings = CONFIGS[name][1]
    tokenizer = AutoTokenizer.from_pretrained(data / "tokenizer")
    model = build_model(seed)
    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH,
                  max_steps=warmup + steps, learning_rate=5e-4, warmup_steps=min(20, warmup + steps), seed=seed,
                  logging_steps=logging_steps, save_strategy="no", report_to="none", disable_tqdm=True,
                  use_cpu=True, dataloader_pin_memory=False, torch_compile=settings.get("compile", False))
    timer = StepTimer()
    if not settings["project"]:
        # The reference: stock collator, dense head, model's own loss, argmax ids stored for accuracy.
        args = TrainingArguments(bf16=settings["bf16"], **common)
        train, evaluation = load_from_disk(data / "train_ref"), load_from_disk(data / "eval_ref")

        def accuracy(eval_prediction):
            predictions, labels = eval_prediction.predictions.reshape(-1), eval_prediction.label_ids.reshape(-1)
            kept = labels != -100
            return {"accuracy": float((predictions[kept] == labels[kept]).mean())}

        trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                          data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=MLM_PROBABILITY),
                          compute_metrics=accuracy,
                          preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(dim=-1),
                          callbacks=[timer.callback])
        masked_fraction = last_layer_fraction = 1.0
    else:
        from types import SimpleNamespace

        from utils.data.masking import build_collator
        from utils.model.mlm_head import install_mlm_head
        from utils.train.precision import apply_precision, gemm_shapes
        from utils.train.trainer import adjust_training_args, build_trainer

        args = TrainingArguments(**common)
        apply_precision(args, settings["precision"], gemm_shapes(model.config, BATCH * SEQ))
        adjust_training_args(args)  # as run_mlm's utils.train.effective_args.settle does
        train, evaluation = load_from_disk(data / "train"), load_from_disk(data / "eval")
        data_args = SimpleNamespace(mlm_probability=MLM_PROBABILITY, mask_replace_prob=0.8, random_replace_prob=0.1,
                                    whole_word_mask=False, pad_to_multiple_of=None)
        collator = build_collator(tokenizer, data_args, args)
        from utils.data.masking import mask_eval_dataset

        evaluation = mask_eval_dataset(evaluation, collator, seed)
        install_mlm_head(model, sparse=settings["sparse"], last_layer=settings.get("last_layer", True))
        from utils.model.cpu import speed_up_for_cpu

        if settings.get("cpu_kernels", True):
            speed_up_for_cpu(model, reuse_memory=settings.get("reuse_memory", True),
                             dropout=settings.get("dropout", True), attention=settings.get("attention", True),
                             tied_gradient=settings.get("tied_gradient", True))
        trainer = build_trainer(model, tokenizer, args, train, evaluation, collator, callbacks=[timer.callback])
        masked_fraction = MLM_PROBABILITY if settings["sparse"] else 1.0
        last_layer_fraction = masked_fraction if settings.get("last_layer", True) else 1.0

    trainer.train()
    times = timer.times
    train_seconds = times[-1] - times[warmup - 1] if warmup else times[-1] - times[0]
    train_tokens = (len(times) - max(warmup, 1)) * BATCH * SEQ
    evaluations = []
    for _ in range(2):  # the first evaluation also warms up; the second is timed
        start = time.perf_counter()
        metrics = trainer.evaluate()
        evaluations.append((time.perf_counter() - start, metrics))
    eval_seconds, eval_metrics = evaluations[-1]
    return {
        "name": name,
        "precision": trainer.accelerator.mixed_precision,
        "train_tokens_per_s": train_tokens / train_seconds,
        "eval_tokens_per_s": len(evaluation) * SEQ / eval_seconds,
        "eval_loss": eval_metrics["eval_loss"],
        "eval_accuracy": eval_metrics.get("eval_accuracy"),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "flops_per_token": flops_per_token(masked_fraction, last_layer_fraction),
        "losses": timer.losses,
        "threads": torch.get_num_threads(),
        "numpy": np.__version__,
    }


def child_command(name, data, steps, warmup, seed, logging_steps):
    return [sys.executable, __file__, "--child", name, "--data", str(data), "--steps", str(steps), "--warmup",
            str(warmup), "--seed", str(seed), "--logging_steps", str(logging_steps)]


def run_in_child(*args) -> dict:
    result = subprocess.run(child_command(*args), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{args[0]} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per configuration")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--eval_blocks", type=int, default=256, help="evaluation blocks of 128 tokens")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--loss_steps", type=int, default=0,
                        help="also train dense and sparse heads (same precision) this many steps and compare losses")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds over all configurations; the table shows each one's median (machines here are "
                             "noisy: interleaving spreads slow periods over all configurations)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--logging_steps", type=int, default=10, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = run_child(args.child, Path(args.data), args.steps, args.warmup, args.seed, args.logging_steps)
        print(json.dumps(result))
        return

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        prepare_data(data, args.eval_blocks)
        # The peaks are measured before and after the runs and the higher kept: on this
        # machine one measurement of the bf16 peak came out at half of another.
        before = {dtype: matmul_peak(dtype) for dtype in ("bfloat16", "float32")}
        gemms_before = model_gemm_rate("bfloat16")
        rounds = [[run_in_child(name, data, args.steps, args.warmup, args.seed, 10) for name in args.configs]
                  for _ in range(args.repeats)]
        peaks = {dtype: max(rate, matmul_peak(dtype)) for dtype, rate in before.items()}
        gemms = max(gemms_before, model_gemm_rate("bfloat16"))
        from utils.train.precision import cpu_description

        print(f"CPU: {cpu_description()}")
        print(f"Machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"matmul peak bf16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s, fp32 {peaks['float32'] / 1e9:.0f} GFLOP/s")
        print(f"Ceiling: this model's own matrix products alone (sparse head, bf16) run at {gemms / 1e9:.0f} GFLOP/s "
              f"= {gemms / peaks['bfloat16']:.0%} of the bf16 peak; no implementation of this shape exceeds that MFU")
        print(f"Model: BERT {LAYERS}x{HIDDEN}, {HEADS} heads, intermediate {INTERMEDIATE}, vocab {VOCAB}; "
              f"seq {SEQ}, batch {BATCH}; {args.warmup} warm-up + {args.steps} timed steps; "
              f"eval on {args.eval_blocks} blocks; median of {args.repeats} interleaved round(s)\n")
        print_table([median_result([r[i] for r in rounds]) for i in range(len(args.configs))], peaks)
        if args.loss_steps:
            compare_losses(data, args)


def median_result(runs: list[dict]) -> dict:
    """One configuration's runs: median speeds, highest memory."""
    import statistics

    merged = dict(runs[0])
    for key in ("train_tokens_per_s", "eval_tokens_per_s"):
        merged[key] = statistics.median(r[key] for r in runs)
    merged["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    merged["spread"] = (min(r["train_tokens_per_s"] for r in runs), max(r["train_tokens_per_s"] for r in runs))
    return merged


def print_table(results: list[dict], peaks: dict) -> None:
    by_name = {r["name"]: r for r in results}
    reference = by_name.get("reference")
    reference_bf16 = by_name.get("reference+bf16")
    print("| configuration | precision | train tok/s (min-max) | vs ref | vs ref+bf16 | eval tok/s | vs ref | "
          "MFU bf16 | MFU fp32 | peak RSS MB | eval loss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    def ratio(r, base, key):
        return f"{r[key] / base[key]:.2f}x" if base else "n/a"

    for r in results:
        achieved = r["train_tokens_per_s"] * r["flops_per_token"]
        low, high = r.get("spread", (r["train_tokens_per_s"],) * 2)
        print(f"| {CONFIGS[r['name']][0]} | {r['precision']} | {r['train_tokens_per_s']:.0f} ({low:.0f}-{high:.0f}) | "
              f"{ratio(r, reference, 'train_tokens_per_s')} | {ratio(r, reference_bf16, 'train_tokens_per_s')} | "
              f"{r['eval_tokens_per_s']:.0f} | {ratio(r, reference, 'eval_tokens_per_s')} | "
              f"{achieved / peaks['bfloat16']:.0%} | {achieved / peaks['float32']:.0%} | "
              f"{r['peak_rss_mb']:.0f} | {r['eval_loss']:.4f} |")


def compare_losses(data: Path, args) -> None:
    """Dense vs sparse head in the same precision, same seed and masks; a second seed measures the noise."""
    steps = args.loss_steps
    runs = {
        "dense": run_in_child("dense-bf16", data, steps, 0, args.seed, 10),
        "sparse": run_in_child("project", data, steps, 0, args.seed, 10),
        "dense, other seed": run_in_child("dense-bf16", data, steps, 0, args.seed + 1, 10),
    }
    print(f"\nLoss curves over {steps} steps (precision {runs['sparse']['precision']}, logged every 10 steps):")
    dense, sparse, other = (dict(runs[k]["losses"]) for k in ("dense", "sparse", "dense, other seed"))
    gap = max(abs(sparse[s] - dense[s]) for s in dense)
    noise = max(abs(other[s] - dense[s]) for s in dense)
    print("| step | dense | sparse | dense, other seed |")
    print("|---|---|---|---|")
    for s in sorted(dense):
        if s % 50 == 0 or s == 10:
            print(f"| {s} | {dense[s]:.4f} | {sparse[s]:.4f} | {other[s]:.4f} |")
    print(f"\nLargest |sparse - dense| over the curve: {gap:.4f}; seed noise (largest |dense - dense other seed|): "
          f"{noise:.4f}")
    print(f"Eval loss after {steps} steps: dense {runs['dense']['eval_loss']:.4f}, sparse "
          f"{runs['sparse']['eval_loss']:.4f}, dense other seed {runs['dense, other seed']['eval_loss']:.4f}")


if __name__ == "__main__":
    main()
