#!/usr/bin/env python
"""What drawing the training masks costs one process per optimizer step, as rank 0 of many.

    python bench/mask_cost.py [--world 64] [--accumulation 8] [--rows 8] [--length 512]

The default is issue #28's layout: a global batch of 4096 blocks of 512 tokens, 64
processes x 8 accumulation steps x 8 rows. Times `MLMCollator.mask_batch` for the
micro-batches of one optimizer step as rank 0 of that layout, and the same local batches
as the only process (world 1, same accumulation: what a process's own rows cost),
interleaved, median of --repeats rounds; prints both and their ratio. Masks depend only
on (seed, step, global row), so the work a rank does should not grow with the world.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.data.masking import build_collator  # noqa: E402
from utils.data.tokenizer import train_wordpiece_tokenizer  # noqa: E402


def collator_for(tokenizer, rank: int, world: int, accumulation: int):
    data_args = SimpleNamespace(mlm_probability=0.15, mask_replace_prob=0.8, random_replace_prob=0.1,
                                whole_word_mask=False, pad_to_multiple_of=None, line_by_line=False,
                                pad_to_max_length=False)
    training_args = SimpleNamespace(seed=42, process_index=rank, local_process_index=rank, world_size=world,
                                    gradient_accumulation_steps=accumulation, device=torch.device("cpu"))
    return build_collator(tokenizer, data_args, training_args)


def step_seconds(collator, batches, step: int) -> float:
    started = time.perf_counter()
    for micro, batch in enumerate(batches):
        collator.mask_batch({k: v.clone() for k, v in batch.items()}, step, micro)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=64)
    parser.add_argument("--accumulation", type=int, default=8)
    parser.add_argument("--rows", type=int, default=8, help="rows per micro-batch per process")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the masks are drawn on the main process's one thread

    words = "alpha beta gamma delta epsilon zeta theta iota kappa lambda".split()
    tokenizer = train_wordpiece_tokenizer([" ".join(words[i:] + words[:i]) for i in range(10)] * 20,
                                          vocab_size=150, model_max_length=args.length)
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(5, len(tokenizer), (args.rows, args.length), generator=generator),
                "attention_mask": torch.ones(args.rows, args.length, dtype=torch.long)}
               for _ in range(args.accumulation)]
    many = collator_for(tokenizer, 0, args.world, args.accumulation)
    alone = collator_for(tokenizer, 0, 1, args.accumulation)
    times = {"rank 0 of world": [], "alone": []}
    for step in range(args.repeats):
        times["rank 0 of world"].append(step_seconds(many, batches, step))
        times["alone"].append(step_seconds(alone, batches, step))
    global_rows = args.world * args.accumulation * args.rows
    print(f"global batch {global_rows} x {args.length} tokens = {args.world} processes x {args.accumulation} "
          f"accumulation steps x {args.rows} rows; {args.repeats} rounds, median")
    as_rank, as_alone = (statistics.median(times[k]) for k in ("rank 0 of world", "alone"))
    print(f"masks per optimizer step as rank 0 of {args.world}: {as_rank * 1e3:.1f} ms")
    print(f"the same {args.accumulation} local micro-batches as the only process: {as_alone * 1e3:.1f} ms")
    print(f"ratio: {as_rank / as_alone:.2f}x")


if __name__ == "__main__":
    main()
