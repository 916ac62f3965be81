"""Run a script with accelerate's DeepSpeed on CPU processes, for the tests.

    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml --num_processes 1 \\
        tests/deepspeed_on_cpu.py run_mlm.py ARGS

accelerate turns DeepSpeed on only off the CPU (its state checks `not cpu`), yet DeepSpeed
runs on the CPU with its CPU accelerator. This turns the CPU run the launcher made back into
the DeepSpeed one the config asked for; the engine, ZeRO's partitioning and the saving are
DeepSpeed's and accelerate's own. Used with one process: across CPU processes DeepSpeed's
losses did not match DDP's (bench/RESULTS.md).
"""

import os
import runpy
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import accelerate.state  # noqa: E402
import deepspeed.comm.torch  # noqa: E402, F401
from accelerate.utils import DistributedType  # noqa: E402

# DeepSpeed's shared-memory comm op serves inference all-reduces only; building it compiles
# C++ for a minute or two on the first run. (The module, not deepspeed.comm's `torch`, which
# is torch itself.)
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None

_init = accelerate.state.AcceleratorState.__init__


def _init_with_deepspeed_on_cpu(self, *args, deepspeed_plugin=None, **kwargs):
    _init(self, *args, deepspeed_plugin=deepspeed_plugin, **kwargs)
    if deepspeed_plugin is not None and self.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        self.distributed_type = DistributedType.DEEPSPEED
        deepspeed_plugin.set_mixed_precision(self._mixed_precision)
        deepspeed_plugin.select(_from_accelerator_state=True)
        self.deepspeed_plugins = deepspeed_plugin


accelerate.state.AcceleratorState.__init__ = _init_with_deepspeed_on_cpu
script, sys.argv = sys.argv[1], sys.argv[1:]
sys.path[0] = str(Path(script).resolve().parent)  # as if the script had been run itself
runpy.run_path(script, run_name="__main__")
