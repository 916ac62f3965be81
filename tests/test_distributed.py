"""Every launch config: the ones this CPU machine can run are run, the others are validated.

The multi-process runs go through the real launcher (`accelerate launch`), with gloo on CPU.
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from utils.data.tokenizer import train_wordpiece_tokenizer

from .conftest import REPO, accelerate_launch, tiny_run_args

CONFIGS = REPO / "accelerate_configs"

# What each file must resolve to: (distributed type, processes, machines, mixed precision).
EXPECTED = {
    "cpu.yaml": ("NO", 1, 1, "no"),
    "multi_cpu.yaml": ("MULTI_GPU", 2, 1, "no"),  # several local processes; gloo on CPU (see the file)
    "single_gpu.yaml": ("NO", 1, 1, "bf16"),
    "multi_gpu.yaml": ("MULTI_GPU", 8, 1, "bf16"),
    "multi_node.yaml": ("MULTI_GPU", 16, 2, "bf16"),
    "fsdp.yaml": ("FSDP", 8, 1, "bf16"),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 8, 1, "bf16"),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 8, 1, "bf16"),
    "tpu.yaml": ("XLA", 8, 1, "no"),  # bf16 comes from run_mlm --precision auto (see the file)
}

# Dropout off: its random draws differ between process layouts, everything else does not.
NO_DROPOUT = ("hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,"
              "max_position_embeddings=64,hidden_dropout_prob=0,attention_probs_dropout_prob=0")


def validate(config_file: Path):
    """Parse a config with accelerate's own launch parser and checks, as `accelerate launch` does."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "run_mlm.py"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


def test_every_config_file_has_an_expectation():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_resolves_to_what_its_name_promises(name):
    args, defaults = validate(CONFIGS / name)
    distributed_type, processes, machines, precision = EXPECTED[name]
    assert defaults.distributed_type.name == distributed_type
    assert (args.num_processes, args.num_machines, args.mixed_precision) == (processes, machines, precision)
    assert defaults.main_training_function == "main"
    # Which launcher accelerate will use: several processes only where the name says so.
    assert args.multi_gpu == (distributed_type == "MULTI_GPU")
    assert args.use_fsdp == (distributed_type == "FSDP")
    assert args.use_deepspeed == (distributed_type == "DEEPSPEED")
    assert args.tpu == (distributed_type == "XLA")


def test_fsdp_config_builds_accelerates_fsdp2_plugin():
    # What each process would build from the launcher's environment. Sharding itself needs
    # GPUs: on a CPU-only machine accelerate falls back to DDP, so this is as far as CI goes.
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _ = validate(CONFIGS / "fsdp.yaml")
    with mock.patch.dict(os.environ, prepare_multi_gpu_env(args)):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"  # saved models load in one process


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_configs_build_accelerates_plugin(name, stage):
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args, defaults = validate(CONFIGS / name)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)
    # Accumulation and clipping are left to the training arguments.
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env and "ACCELERATE_GRADIENT_CLIPPING" not in env
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == stage
    # ZeRO-3 gathers the sharded weights when saving, so the final model loads in one process.
    assert plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] == (stage == 3)


# ---- real multi-process runs on this machine ----

@pytest.fixture(scope="module")
def shared_tokenizer(tmp_path_factory, corpus):
    """One saved tokenizer for runs that must see the same token ids (WordPiece training is not reproducible)."""
    path = tmp_path_factory.mktemp("tokenizer")
    lines = corpus.read_text().splitlines()
    train_wordpiece_tokenizer(lines, vocab_size=120, model_max_length=64).save_pretrained(path)
    return path


def comparable_args(output_dir, corpus, tokenizer, per_device_batch, *extra):
    args = tiny_run_args(output_dir, corpus, "--tokenizer_name", tokenizer, "--max_steps", "20",
                         "--logging_steps", "5", "--per_device_train_batch_size", per_device_batch,
                         "--per_device_eval_batch_size", per_device_batch, *extra)
    args[args.index("--config_overrides") + 1] = NO_DROPOUT
    return args


def losses(output_dir):
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def process_lines(output: str, what: str) -> dict[int, str]:
    """{rank: value} from the per-process lines 'Process R of N after training: <what> checksum X'."""
    return {int(r): v for r, v in re.findall(rf"Process (\d+) of \d+ after training: .*?{what} checksum (\w+)",
                                             output)}


@pytest.fixture(scope="module")
def one_and_two_processes(tmp_path_factory, corpus, shared_tokenizer):
    """The same training (global batch 16, seed 0) on 1 process and on 2 processes of 8 rows each."""
    root = tmp_path_factory.mktemp("layouts")
    saving = ["--save_strategy", "steps", "--save_steps", "10"]
    one = accelerate_launch("accelerate_configs/cpu.yaml",
                            comparable_args(root / "one", corpus, shared_tokenizer, 16, *saving),
                            env={"HF_HOME": str(root / "hf_one")})
    two = accelerate_launch("accelerate_configs/multi_cpu.yaml",
                            comparable_args(root / "two", corpus, shared_tokenizer, 8, *saving),
                            env={"HF_HOME": str(root / "hf_two")})
    for result in (one, two):
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root, one, two


def test_two_processes_form_one_training(one_and_two_processes):
    _, _, two = one_and_two_processes
    out = two.stdout
    assert "Process rank 0 of 2" in out and "Process rank 1 of 2" in out
    # Both replicas end with the same parameters and read text with the same vocabulary.
    params = process_lines(out, "parameter")
    assert sorted(params) == [0, 1] and params[0] == params[1]
    data = process_lines(out, "data")  # what each process trained on: its own half of every global batch
    assert sorted(data) == [0, 1] and data[0] != data[1]
    # Rank 1 read rank 0's tokenized cache instead of tokenizing again.
    assert "Process 1 read the tokenized data from the main process's cache" in out
    assert "tokenized the data again" not in out + two.stderr


def test_two_processes_log_the_loss_of_one_process(one_and_two_processes):
    root, _, _ = one_and_two_processes
    one, two = losses(root / "one"), losses(root / "two")
    assert sorted(one) == sorted(two) == [5, 10, 15, 20]
    # Same global batches, same masks (they depend on seed, step and row only), no dropout:
    # what remains is the order of float sums (the all-reduce adds two half-gradients).
    # Measured: at most 8e-7. A loss multiplied by the world size would be off by ~4.
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5), (step, one[step], two[step])
    one_eval = json.loads((root / "one" / "all_results.json").read_text())["eval_loss"]
    two_eval = json.loads((root / "two" / "all_results.json").read_text())["eval_loss"]
    assert two_eval == pytest.approx(one_eval, abs=1e-5)


def test_two_process_checkpoint_loads_in_one_process_and_resumes(one_and_two_processes, corpus, shared_tokenizer):
    from transformers import AutoModelForMaskedLM

    root, _, _ = one_and_two_processes
    out = root / "two"
    assert AutoModelForMaskedLM.from_pretrained(out / "checkpoint-10") is not None
    assert AutoModelForMaskedLM.from_pretrained(out) is not None
    uninterrupted = losses(out)
    # Lose the second half of the run (its last checkpoint and the final results, as if it
    # had stopped after checkpoint-10), then run the same command again: it resumes from
    # checkpoint-10 and, with the same masks and batches, logs the same losses. (With the
    # final results there, the run is finished and a rerun changes nothing: tests/test_rerun.py.)
    import shutil

    shutil.rmtree(out / "checkpoint-20")
    for name in ("train_results.json", "all_results.json"):
        (out / name).unlink()
    result = accelerate_launch("accelerate_configs/multi_cpu.yaml",
                               comparable_args(out, corpus, shared_tokenizer, 8, "--save_strategy", "steps",
                                               "--save_steps", "10"),
                               env={"HF_HOME": str(root / "hf_two")})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "checkpoint-10" in result.stdout and "Resuming from" in result.stdout
    resumed = losses(out)
    for step in (15, 20):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-5)


def test_processes_that_do_not_join_are_refused(corpus, tmp_path):
    # ACCELERATE_USE_CPU=0 on a machine without GPUs: accelerate gives each process a world
    # of its own. Two independent trainings must not start.
    result = accelerate_launch("accelerate_configs/multi_cpu.yaml", tiny_run_args(tmp_path / "out", corpus),
                               env={"ACCELERATE_USE_CPU": "0"})
    assert result.returncode != 0
    assert "error: the launcher started 2 processes, but they did not join one process group" in result.stderr
    assert not (tmp_path / "out").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost_train_and_save_once(corpus, tmp_path):
    # Two `accelerate launch` commands, machine_rank 0 and 1, as on two machines. Separate
    # HF_HOMEs stand for separate disks: the tokenizer trained from scratch on node 0 must
    # reach node 1 through the process group, not through a shared cache.
    out = tmp_path / "out"
    port = free_port()
    args = tiny_run_args(out, corpus, "--max_steps", "10")
    nodes = [
        accelerate_launch("accelerate_configs/multi_node.yaml", args, wait=False,
                          launcher_args=["--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                                         "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)],
                          env={"HF_HOME": str(tmp_path / f"hf_node{rank}")})
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stdout[-3000:] + stderr[-3000:]
    node0, node1 = (stdout for stdout, _ in outputs)
    assert "Process rank 0 of 2" in node0 and "Process rank 1 of 2" in node1
    vocab = {**process_lines(node0, "tokenizer"), **process_lines(node1, "tokenizer")}
    params = {**process_lines(node0, "parameter"), **process_lines(node1, "parameter")}
    assert sorted(vocab) == [0, 1] and vocab[0] == vocab[1]
    assert params[0] == params[1]
    # Only node 0 saved: the model files exist once, and node 1 never wrote a model.
    assert (out / "model.safetensors").exists() and (out / "all_results.json").exists()
    assert "Writing model shards" in outputs[0][1] and "Writing model shards" not in outputs[1][1]
    assert json.loads((out / "all_results.json").read_text())["train_samples"] > 0


def test_cpu_processes_get_their_share_of_the_cpus(monkeypatch):
    from types import SimpleNamespace

    from utils.train.cpu_process import fit_cpu_threads

    before = torch.get_num_threads()
    usable = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(usable))
    try:
        torch.set_num_threads(2)  # what accelerate gives when it counts a host's cores
        line = fit_cpu_threads(SimpleNamespace(device=torch.device("cpu")))
        assert torch.get_num_threads() == 1
        assert line.startswith(f"1 thread per process ({usable} usable CPUs / {usable} processes")
        assert fit_cpu_threads(SimpleNamespace(device=torch.device("cpu"))) is None  # already fair: unchanged
    finally:
        torch.set_num_threads(before)


def test_leave_process_group_destroys_the_group_and_is_a_no_op_without_one(tmp_path):
    code = (
        "import torch.distributed as dist\n"
        "from utils.train.distributed import leave_process_group\n"
        "leave_process_group()\n"  # no group yet: nothing to do
        f"dist.init_process_group('gloo', init_method='file://{tmp_path}/rendezvous', rank=0, world_size=1)\n"
        "assert dist.is_initialized()\n"
        "leave_process_group()\n"
        "print(dist.is_initialized())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


def run_two_ranks(code: str, *args: str, timeout: int) -> list[str]:
    """Run `python -c code RANK *args` as ranks 0 and 1 side by side; their stdouts, once both exited 0.

    A rank still running at the timeout (a hang) is killed, and the test fails on it.
    """
    processes = [subprocess.Popen([sys.executable, "-c", code, str(rank), *args], cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        outputs = [process.communicate(timeout=timeout) for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-2000:]
    return [stdout for stdout, _ in outputs]


VOTE = """
import json, sys
from types import SimpleNamespace
import torch
import torch.distributed as dist
from transformers import TrainerControl, TrainerState
from utils.train.signals import GracefulStop

rank, rendezvous, signals = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
# The TrainingArguments fields GracefulStop reads, for rank `rank` of two CPU processes.
args = SimpleNamespace(ddp_timeout=120, device=torch.device("cpu"), world_size=2, process_index=rank,
                       local_process_index=rank)
stop = GracefulStop()
stop.on_train_begin(args, None, TrainerControl())
stopped_at = None
for step in range(1, 30):
    if signals.get(str(step), {}).get(str(rank)):  # what this process's handler records during the step
        stop.signal = signals[str(step)][str(rank)]
    control = TrainerControl()
    stop.on_step_end(args, TrainerState(global_step=step), control)
    if control.should_training_stop:
        assert control.should_save
        stopped_at = step
        break
stop.on_train_end(args, None, TrainerControl())
print(json.dumps({"step": stopped_at, "signal": stop.stopped}))
dist.destroy_process_group()
"""


@pytest.mark.parametrize("signals, expected", [
    # Only process 0 saw the signal before step 5's end; process 1 would have seen it after.
    ({"5": {"0": "SIGTERM"}}, {"step": 6, "signal": "SIGTERM"}),
    ({"5": {"0": "SIGINT"}, "6": {"1": "SIGTERM"}}, {"step": 6, "signal": "SIGINT"}),
    ({"2": {"0": "SIGINT", "1": "SIGTERM"}}, {"step": 3, "signal": "SIGTERM"}),
])
def test_processes_signalled_at_different_steps_stop_after_the_same_step(tmp_path, signals, expected):
    # Stopping at different steps would leave one process waiting forever in the other's
    # checkpoint collectives: the processes must agree on the step, and on the signal.
    outputs = run_two_ranks(VOTE, str(tmp_path / "rendezvous"), json.dumps(signals), timeout=120)
    assert [json.loads(stdout.strip().splitlines()[-1]) for stdout in outputs] == [expected, expected]


def test_one_process_stops_at_the_step_it_was_signalled():
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    from utils.train.signals import GracefulStop

    stop = GracefulStop()
    args = SimpleNamespace(ddp_timeout=120, device=torch.device("cpu"), world_size=1, process_index=0,
                           local_process_index=0)
    stop.on_train_begin(args, None, TrainerControl())
    try:
        control = TrainerControl()
        stop.on_step_end(args, TrainerState(global_step=1), control)
        assert not control.should_training_stop and stop.stopped is None
        stop.signal = "SIGTERM"
        stop.on_step_end(args, TrainerState(global_step=2), control)
        assert control.should_training_stop and control.should_save and stop.stopped == "SIGTERM"
    finally:
        stop.on_train_end(args, None, TrainerControl())


def test_sigterm_to_the_launcher_stops_both_processes_after_one_step_with_a_checkpoint(corpus, tmp_path):
    import signal

    out = tmp_path / "out"
    launcher = accelerate_launch("accelerate_configs/multi_cpu.yaml",
                                 tiny_run_args(out, corpus, "--max_steps", "100000", "--logging_steps", "1"),
                                 wait=False)
    for line in launcher.stdout:  # training is under way in both processes (a step needs both)
        if "'loss'" in line:
            break
    launcher.send_signal(signal.SIGTERM)  # what a scheduler does; the launcher forwards it to each process
    stdout, stderr = launcher.communicate(timeout=120)
    steps = re.findall(r"stopped: SIGTERM at step (\d+): saved", stderr)
    assert len(steps) == 2 and steps[0] == steps[1], stderr[-3000:]
    checkpoint = out / f"checkpoint-{steps[0]}"
    assert (checkpoint / "trainer_state.json").exists() and (checkpoint / "model.safetensors").exists()
    assert not (out / "model.safetensors").exists()
    # Both left on their own, within the launcher's grace period: nothing was killed mid-way.
    assert "forcefully exiting" not in stderr
    assert sorted(p.name for p in out.iterdir()) == [checkpoint.name]


TEARDOWN = """
import sys
import torch, torch.distributed as dist
from utils.train.distributed import leave_process_group
rank, root = int(sys.argv[1]), sys.argv[2]
for i in range(40):
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous{i}", rank=rank, world_size=2)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
    gathered = [torch.zeros(3) for _ in range(2)]
    dist.all_gather(gathered, torch.ones(3))  # a collective just before the end, as an evaluation's gather
    leave_process_group()
    del model  # DDP's Reducer frees the group's last reference
print("done")
"""


def test_leaving_right_after_a_collective_does_not_deadlock_ddp_teardown(tmp_path):
    # With destroy_process_group alone, this hung within ~15 rounds: a gloo worker thread,
    # freeing the gather's tensors, waited for the GIL while the Reducer's destructor held
    # it and waited for the worker (a finished 2-process run hung at exit the same way).
    assert [stdout.strip() for stdout in run_two_ranks(TEARDOWN, str(tmp_path), timeout=90)] == ["done", "done"]
