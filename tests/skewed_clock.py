"""Run a script with a simulated clock per process, for the time-budget tests.

    accelerate launch --config_file accelerate_configs/multi_cpu.yaml --num_processes 2 tests/skewed_clock.py \
        run_mlm.py ARGS

Every reading of the time budget's clock (`utils.train.budget._now`) advances it by 1 + RANK seconds:
process 0 sees 1-second steps and process 1 sees 2-second ones. Processes that went by their
own clocks would disagree on the learning rate and on when to stop (one of them would then wait
forever in the next all-reduce); the run must agree on one clock.
"""

import itertools
import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import utils.train.budget  # noqa: E402

_ticks = itertools.count(1)
_rate = 1 + int(os.environ.get("RANK", "0"))
utils.train.budget._now = lambda: float(next(_ticks) * _rate)

script, sys.argv = sys.argv[1], sys.argv[1:]
sys.path[0] = str(Path(script).resolve().parent)  # as if the script had been run itself
runpy.run_path(script, run_name="__main__")
