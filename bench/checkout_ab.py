"""One training step's time and loss, this checkout against another (a refactor must cost nothing and change nothing).

    python bench/checkout_ab.py /path/to/other/checkout [--rounds 3] [--steps 15]

Each round runs both checkouts in fresh processes, one after the other: BERT 6x384, batch
16 x 128, 15% of positions labelled, bf16 autocast, the sparse head and the CPU speed-ups,
as run_mlm.py sets them up. Prints each run's median step time (after 3 warm-up steps) and
loss, and this checkout's time over the other's per round.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

STEP = """
import statistics, sys, time
sys.path.insert(0, {repo!r})
import torch
from transformers import BertConfig, BertForMaskedLM
try:
    from utils.model.cpu import speed_up_for_cpu
    from utils.model.mlm_head import install_mlm_head
except ImportError:  # a checkout from before utils/ had subpackages
    from utils.cpu import speed_up_for_cpu
    from utils.mlm_head import install_mlm_head
torch.manual_seed(0)
model = BertForMaskedLM(BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                                   intermediate_size=1536))
install_mlm_head(model)
speed_up_for_cpu(model)
model.train()
g = torch.Generator().manual_seed(1)
ids = torch.randint(1000, 30000, (16, 128), generator=g)
labels = torch.where(torch.rand(16, 128, generator=g) < 0.15, ids, -100)
times = []
for i in range({steps}):
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    if i >= 3:
        times.append(time.perf_counter() - start)
print(statistics.median(times), loss.item())
"""


def step(repo: Path, steps: int) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", STEP.format(repo=str(repo), steps=steps)], capture_output=True,
                         text=True, check=True)
    seconds, loss = out.stdout.split()
    return float(seconds), float(loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1]
    from utils.train.precision import cpu_description

    print(f"CPU: {cpu_description()}")
    for r in range(args.rounds):
        (other_s, other_loss), (here_s, here_loss) = step(args.other, args.steps), step(here, args.steps)
        print(f"round {r + 1}: other {1000 * other_s:.1f} ms (loss {other_loss:.6f}), this checkout "
              f"{1000 * here_s:.1f} ms (loss {here_loss:.6f}): {here_s / other_s:.3f}x the time")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
