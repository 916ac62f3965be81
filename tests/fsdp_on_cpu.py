"""Run a script with accelerate's FSDP2 on CPU processes (gloo), for the tests.

    accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 2 tests/fsdp_on_cpu.py run_mlm.py ARGS

accelerate shards only on GPUs (its state turns FSDP on for multi-GPU types and leaves a
multi-CPU run as DDP), yet torch's `fully_shard` runs on CPU processes over gloo. This
turns the multi-CPU run the launcher made back into the FSDP one the config asked for,
and changes nothing else: the model is sharded by accelerate's own FSDP2 path, as on GPUs.
"""

import runpy
import sys
from pathlib import Path

import accelerate.state
from accelerate.utils import DistributedType

_init = accelerate.state.AcceleratorState.__init__


_plugin = []  # the FSDP plugin the Accelerator brought (the state is rebuilt without one later on)


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and not _plugin:
        _plugin.append(fsdp_plugin)
    if _plugin and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = _plugin[0]
        if self._mixed_precision != "no":
            _plugin[0].set_mixed_precision(self._mixed_precision)


accelerate.state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu
script, sys.argv = sys.argv[1], sys.argv[1:]
sys.path[0] = str(Path(script).resolve().parent)  # as if the script had been run itself
runpy.run_path(script, run_name="__main__")
