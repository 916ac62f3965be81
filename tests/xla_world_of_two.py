"""run_mlm.main() as replica 0 of two XLA replicas, for tests/test_xla.py (run in the XLA environment).

torch_xla's CPU backend cannot run two replicas here: its replicas are threads of one
process, which compile their graphs separately and never meet in a collective. So this
launches one real replica and tells the code there are two, at the one place it asks
(`TrainingArguments.world_size`, which `utils.train.distributed.processes` reads). XLA's own
rendezvous runs for real (with one participant) and is recorded; every torch.distributed
collective raises, as it would on a TPU, where accelerate creates no process group.

    accelerate launch --config_file accelerate_configs/tpu.yaml tests/xla_world_of_two.py RUN_MLM_ARGS...
"""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COLLECTIVES = ("barrier", "broadcast_object_list", "broadcast", "all_reduce", "all_gather", "all_gather_object",
               "new_group", "gather_object", "scatter_object_list", "monitored_barrier", "init_process_group")


def main():
    import torch.distributed as dist
    import torch_xla.core.xla_model as xm
    from transformers import TrainingArguments

    sys.path.insert(0, str(REPO))
    import run_mlm

    def refuse(*args, **kwargs):
        raise AssertionError("torch.distributed called on XLA, where accelerate creates no process group")

    for name in COLLECTIVES:
        setattr(dist, name, refuse)
    tags = []
    real_rendezvous = xm.rendezvous

    def recorded_rendezvous(tag, payload=b"", replicas=()):
        tags.append(tag)
        return real_rendezvous(tag, payload, list(replicas))

    xm.rendezvous = recorded_rendezvous
    TrainingArguments.world_size = property(lambda self: 2)
    results = run_mlm.main()
    print("RENDEZVOUS " + json.dumps(tags), flush=True)
    print("RESULTS " + json.dumps({k: v for k, v in results.items() if isinstance(v, int | float)}), flush=True)
