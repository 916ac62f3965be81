"""The TPU path: `accelerate_configs/tpu.yaml` run for real on torch_xla's CPU backend (PJRT_DEVICE=CPU).

torch_xla lives in its own environment (scripts/setup_xla_env.sh); these tests drive it as
a subprocess and check its output in the main environment. They need RUN_MLM_XLA_PYTHON
(the path the script prints); CI sets it, and RUN_MLM_REQUIRE_XLA=1 turns a missing
environment into a failure instead of a skip.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from run_mlm import main

from .conftest import REPO, tiny_run_args

XLA_PYTHON = os.environ.get("RUN_MLM_XLA_PYTHON")
if not XLA_PYTHON and os.environ.get("RUN_MLM_REQUIRE_XLA"):
    raise RuntimeError("RUN_MLM_REQUIRE_XLA is set but RUN_MLM_XLA_PYTHON is not: run scripts/setup_xla_env.sh")
needs_xla = pytest.mark.skipif(not XLA_PYTHON, reason="set RUN_MLM_XLA_PYTHON=$(bash scripts/setup_xla_env.sh)")


def test_main_environment_has_no_torch_xla():
    # With torch_xla merely installed, accelerate would switch every run to XLA.
    assert importlib.util.find_spec("torch_xla") is None


def xla_args(output_dir, corpus):
    return tiny_run_args(output_dir, corpus, "--max_steps", "30", "--logging_steps", "5", "--eval_strategy", "steps",
                         "--eval_steps", "10", "--per_device_eval_batch_size", "8")


def launch_tpu(args, hf_home, script=None, log=None, env=None):
    """`accelerate launch --config_file accelerate_configs/tpu.yaml run_mlm.py ARGS` on torch_xla's CPU backend.

    With `log` (a path), returns the running Popen, its output going to that file.
    """
    env = {**os.environ, "PJRT_DEVICE": "CPU", "PYTHONUNBUFFERED": "1", "HF_HOME": str(hf_home), **(env or {})}
    env.pop("ACCELERATE_USE_CPU", None)
    command = [XLA_PYTHON, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "accelerate_configs/tpu.yaml"), str(script or REPO / "run_mlm.py"), *map(str, args)]
    if log is not None:
        with open(log, "w") as output:
            return subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def xla_run(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("xla") / "out"
    result = launch_tpu(xla_args(out, corpus), tmp_path_factory.mktemp("xla_hf"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out, result


@needs_xla
def test_tpu_config_trains_evaluates_with_accuracy_and_saves(xla_run):
    out, result = xla_run
    output = result.stdout + result.stderr  # under XLA, logs go through torch_xla's stderr handler
    assert "device xla:0" in output
    assert "XLA: set --optim adamw_torch" in output
    assert "XLA: nan/inf gradients are not checked (--nonfinite_loss has no effect on XLA" in output
    # Masked positions only, in 16 slots per block of 32 tokens: the same shapes at every step.
    assert "MLM head: sparse, 16 prediction slots per block" in output
    assert "Training masks: 0 of " in output  # at 15% of 32 tokens, no block of this run went over
    results = json.loads((out / "all_results.json").read_text())
    # The reference switches metrics off on TPU; here accuracy and perplexity are reported.
    assert 0 < results["eval_accuracy"] <= 1 and results["perplexity"] > 1
    assert results["eval_loss"] < 4.6  # trained: ln(120) = 4.8 untrained
    assert (out / "model.safetensors").exists()


@needs_xla
def test_graph_compiles_once(xla_run):
    out, _ = xla_run
    counts = json.loads((out / "xla_compilations.json").read_text())
    # Warm-up: the first steps, the first logging step and the step after it.
    assert counts["training_compilations_in_warmup"] > 0  # the counter does count
    assert counts["training_compilations_after_warmup"] == 0, counts
    evaluations = counts["compilations_per_evaluation"]
    assert len(evaluations) >= 3 and evaluations[0] > 0 and evaluations[1:] == [0] * (len(evaluations) - 1)
    logs = counts["compilations_per_log"]
    assert logs[1:] == [0] * (len(logs) - 1)


@needs_xla
def test_model_saved_on_xla_gives_the_same_eval_loss_in_plain_torch(xla_run, corpus, tmp_path):
    out, _ = xla_run
    xla_results = json.loads((out / "all_results.json").read_text())
    args = xla_args(tmp_path / "cpu_eval", corpus)
    args = ["--model_name_or_path", str(out), *args[args.index("--train_file"):]]
    args.remove("--do_train")
    cpu_results = main(args)
    # Same weights, same fixed eval masks, same 32 blocks; fp32 on both sides. XLA's CPU
    # compiler fuses and orders float ops differently from ATen: measured difference 1e-6.
    assert cpu_results["eval_samples"] == xla_results["eval_samples"]
    assert cpu_results["eval_loss"] == pytest.approx(xla_results["eval_loss"], abs=1e-4)
    assert cpu_results["eval_accuracy"] == pytest.approx(xla_results["eval_accuracy"], abs=1e-6)


def test_xla_environment_is_not_used_by_the_main_one():
    assert "xla" not in sys.executable


def test_nonfinite_skip_is_refused_on_xla_and_stop_is_announced():
    from utils.errors import UsageError
    from utils.train.xla import nonfinite_check_note

    with pytest.raises(UsageError, match="--nonfinite_loss skip is not supported on XLA"):
        nonfinite_check_note("skip")
    assert "not checked" in nonfinite_check_note("stop")


@needs_xla
def test_downstream_fine_tunes_on_xla(tmp_path, corpus):
    """utils.tools.downstream under the TPU config: classification on torch_xla's CPU backend, static shapes."""
    from transformers import BertConfig, BertForMaskedLM

    from utils.data.tokenizer import train_wordpiece_tokenizer

    from .test_downstream import labelled_rows, write_csv

    model = tmp_path / "model"
    tokenizer = train_wordpiece_tokenizer([t for t, _ in labelled_rows(300, 2)], vocab_size=120, model_max_length=64)
    tokenizer.save_pretrained(model)
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64)).save_pretrained(model)
    train, dev = write_csv(tmp_path / "train.csv", labelled_rows(160, 0)), write_csv(tmp_path / "dev.csv",
                                                                                     labelled_rows(64, 1))
    env = {**os.environ, "PJRT_DEVICE": "CPU", "PYTHONUNBUFFERED": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("ACCELERATE_USE_CPU", None)
    result = subprocess.run(
        [XLA_PYTHON, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs/tpu.yaml"),
         "-m", "utils.tools.downstream", "--models", f"tiny={model}", "--train_file", train, "--validation_file", dev,
         "--seeds", "1", "--output_dir", str(tmp_path / "out"), "--learning_rate", "5e-3", "--num_train_epochs", "3",
         "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16", "--max_seq_length", "32",
         "--disable_tqdm", "true"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "device xla:0" in result.stdout + result.stderr
    saved = json.loads((tmp_path / "out" / "downstream_results.json").read_text())
    assert saved["tiny"]["accuracy_mean"] > saved["task"]["majority_accuracy"] + 0.2


# --- several XLA replicas, at the boundary (torch_xla's CPU backend runs one replica per process in CI) -----

def fake_torch_xla(monkeypatch, device_type="TPU", payloads_from_replica_0=None):
    """A stand-in torch_xla in the main environment: XLA's rendezvous as two replicas would answer it.

    Returns the list of (tag, payload) rendezvous calls. `payloads_from_replica_0`: what replica 0
    sends, as the other replica receives it (default: what this process sends).
    """
    import types

    calls = []

    def rendezvous(tag, payload=b"", replicas=()):
        calls.append((tag, payload))
        first = payload if payloads_from_replica_0 is None else payloads_from_replica_0
        return [first, b""]

    package, core = types.ModuleType("torch_xla"), types.ModuleType("torch_xla.core")
    xm, runtime = types.ModuleType("torch_xla.core.xla_model"), types.ModuleType("torch_xla.runtime")
    xm.rendezvous = rendezvous
    runtime.device_type = lambda: device_type
    package.core, package.runtime, core.xla_model = core, runtime, xm
    for name, module in (("torch_xla", package), ("torch_xla.core", core), ("torch_xla.core.xla_model", xm),
                         ("torch_xla.runtime", runtime)):
        monkeypatch.setitem(sys.modules, name, module)
    return calls


def no_torch_distributed(monkeypatch):
    """Every torch.distributed collective raises, as it does on XLA, where no process group exists."""
    import torch.distributed as dist

    def refuse(*args, **kwargs):
        raise AssertionError("torch.distributed called on XLA, where accelerate creates no process group")

    for name in COLLECTIVES:
        monkeypatch.setattr(dist, name, refuse)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)


def replica_args(rank, world=2, local_rank=None):
    import torch

    return SimpleNamespace(process_index=rank, local_process_index=rank if local_rank is None else local_rank,
                           world_size=world, device=torch.device("xla", 0), ddp_timeout=1800)


def test_processes_answers_who_and_how_for_every_backend():
    import torch

    from utils.train.distributed import Processes, processes

    cpu = SimpleNamespace(process_index=0, local_process_index=-1, world_size=1, device=torch.device("cpu"))
    assert processes(cpu) == Processes(rank=0, local_rank=0, world=1, backend="single")
    gloo = SimpleNamespace(process_index=3, local_process_index=1, world_size=4, device=torch.device("cpu"))
    assert processes(gloo) == Processes(rank=3, local_rank=1, world=4, backend="torch")
    assert processes(replica_args(rank=5, world=8, local_rank=1)) == Processes(rank=5, local_rank=1, world=8,
                                                                           backend="xla")


@pytest.mark.parametrize("rank", [0, 1])
def test_on_xla_waits_and_broadcasts_use_xla_rendezvous_never_torch_distributed(monkeypatch, rank):
    import pickle

    from utils.train import distributed
    sent = {"tokenizer.json": b"{}"}
    calls = fake_torch_xla(monkeypatch, payloads_from_replica_0=pickle.dumps(sent))
    no_torch_distributed(monkeypatch)
    args = replica_args(rank)
    with distributed.main_process_first(args, "tokenizing"):
        calls.append(("work", None))
    # The first replica works, then joins the rendezvous in which the second waited before its own work.
    tags = [tag for tag, _ in calls]
    assert tags == (["work", "run_mlm: tokenizing"] if rank == 0 else ["run_mlm: tokenizing", "work"])
    calls.clear()
    computed = []
    result = distributed.compute_once(args, lambda: computed.append(1) or sent, "training the tokenizer")
    assert result == sent and computed == ([1] if rank == 0 else [])  # computed once, received by the others
    assert calls == [("run_mlm: training the tokenizer", pickle.dumps(sent) if rank == 0 else b"")]
    assert distributed.vote_group(args) is None  # XLA agrees on stopping its own way


def test_torch_distributed_is_called_only_behind_the_backend_check():
    """Static: every torch.distributed collective in the code is in a function that dispatches on the backend
    (tested above with XLA) or that only runs with a torch.distributed group."""
    import ast

    allowed = {("distributed", "_group"), ("distributed", "vote_group"), ("distributed", "_wait_for_all"),
               ("distributed", "compute_once"), ("signals", "_agree"), ("budget", "exchange")}
    found = set()
    for path in [*REPO.glob("utils/**/*.py"), REPO / "run_mlm.py"]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in COLLECTIVES and isinstance(node.func.value, ast.Name | ast.Attribute)
                        and ast.unparse(node.func.value) in ("dist", "torch.distributed")):
                    found.add((path.stem, function.name))
    assert found == allowed, f"torch.distributed collectives outside the backend-checked functions: {found - allowed}"


COLLECTIVES = ("barrier", "broadcast_object_list", "broadcast", "all_reduce", "all_gather", "all_gather_object",
               "new_group", "gather_object", "scatter_object_list", "monitored_barrier")


@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_bf16_on_a_tpu_is_autocast_with_fp32_weights_not_xla_use_bf16(monkeypatch, precision):
    import torch

    from utils.train.precision import apply_precision
    from utils.train.xla import XLAAutocast

    fake_torch_xla(monkeypatch, device_type="TPU")
    args = SimpleNamespace(device=torch.device("xla", 0), mixed_precision="no", bf16=False, fp16=False,
                           world_size=1, process_index=0, local_process_index=0)
    assert apply_precision(args, precision) == "bf16"
    # accelerate exports XLA_USE_BF16=1 (bf16 weights and optimizer state) exactly when it is told "bf16" on
    # a TPU (accelerate/state.py); told "no", it leaves the weights alone and our Trainer autocasts.
    assert (args.mixed_precision, args.bf16, args.fp16) == ("no", False, False)
    assert args.xla_autocast_bf16

    class Base:
        def autocast_smart_context_manager(self, cache_enabled=True):
            return "accelerate's"

    class Trainer(XLAAutocast, Base):
        pass

    trainer = Trainer()
    trainer.args = args
    autocast = trainer.autocast_smart_context_manager()
    assert isinstance(autocast, torch.autocast)
    assert (autocast.device, autocast.fast_dtype) == ("xla", torch.bfloat16)
    args.xla_autocast_bf16 = False
    assert trainer.autocast_smart_context_manager() == "accelerate's"


def test_fp32_on_a_tpu_and_auto_on_xlas_cpu_backend_stay_fp32(monkeypatch):
    import torch

    from utils.train.precision import apply_precision

    fake_torch_xla(monkeypatch, device_type="CPU")  # torch_xla's CPU backend has no bf16 units
    args = SimpleNamespace(device=torch.device("xla", 0), mixed_precision="no", bf16=False, fp16=False,
                           world_size=1, process_index=0, local_process_index=0)
    assert apply_precision(args, "auto") == "no" and not args.xla_autocast_bf16
    fake_torch_xla(monkeypatch, device_type="TPU")
    assert apply_precision(args, "fp32") == "no" and not args.xla_autocast_bf16


def test_a_stop_raised_in_a_replica_reaches_the_launcher_intact():
    # torch_xla's launcher sends a replica's exception to the launching process pickled.
    import pickle

    from utils.train.signals import Interrupted

    error = pickle.loads(pickle.dumps(Interrupted("SIGTERM", 524, "outputs/run")))
    assert (str(error), error.exit_code) == ("SIGTERM at step 524: saved outputs/run/checkpoint-524; run the same "
                                             "command to resume from it", 143)


# --- on torch_xla's CPU backend: the fixed-slot head, two replicas at the boundary, SIGTERM, bf16 ------------

SLOT_HEAD_ON_XLA = """
import json, sys, torch, torch_xla
sys.path.insert(0, {repo!r})
import torch_xla.debug.metrics as met
from transformers import BertConfig, BertForMaskedLM
from utils.data.masking import cap_selection
from utils.model.mlm_head import install_mlm_head

device = torch_xla.device()
def model():
    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64)).eval()
dense, slotted = model(), model()
install_mlm_head(dense, sparse=False)
install_mlm_head(slotted, slots=8)
dense.to(device); slotted.to(device)
out = {{"dense": [], "slots": [], "compilations": []}}
for step in range(8):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(5, 300, (8, 48), generator=g)
    draws = torch.rand(8, 48, generator=g)
    selected = cap_selection(draws < 0.2, draws, 8)  # a different number of masked tokens in every batch
    labels = torch.where(selected, ids, -100)
    batch = {{"input_ids": ids.to(device), "labels": labels.to(device)}}
    n = selected.sum().to(device)
    before = met.metric_data("CompileTime")[0] if met.metric_data("CompileTime") else 0
    for name, m in (("dense", dense), ("slots", slotted)):
        m.zero_grad()
        loss = m(**batch, num_items_in_batch=n).loss
        loss.backward()
        torch_xla.sync()
        grad = m.bert.encoder.layer[0].attention.self.query.weight.grad
        out[name].append([float(loss.cpu()), float(grad.abs().sum().cpu())])
    out["compilations"].append((met.metric_data("CompileTime")[0] if met.metric_data("CompileTime") else 0) - before)
print("RESULT " + json.dumps(out))
"""


@needs_xla
def test_slot_head_on_xla_gives_the_dense_loss_and_compiles_once(tmp_path):
    env = {**os.environ, "PJRT_DEVICE": "CPU", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([XLA_PYTHON, "-c", SLOT_HEAD_ON_XLA.format(repo=str(REPO))], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = json.loads(result.stdout.split("RESULT ", 1)[1])
    for (dense_loss, dense_grad), (slot_loss, slot_grad) in zip(out["dense"], out["slots"]):
        assert slot_loss == pytest.approx(dense_loss, abs=1e-4)
        assert slot_grad == pytest.approx(dense_grad, rel=1e-4)
    # torch_xla's warm-up (the first steps, as the Trainer's CompilationCounter counts them) compiles both
    # heads' graphs; after it, batches with other numbers of masked tokens compile nothing.
    assert out["compilations"][0] > 0 and out["compilations"][3:] == [0] * 5, out["compilations"]


@needs_xla
def test_two_xla_replicas_prepare_train_and_save_through_xlas_rendezvous_only(tmp_path, corpus):
    """Replica 0 of a faked world of two (see tests/xla_world_of_two.py): the built-in corpus, the tokenizer
    trained once and shared, tokenizing, the evaluation masks, training, evaluation and saving all complete, each
    wait in XLA's rendezvous, none in torch.distributed (which on a TPU has no process group)."""
    args = [*tiny_run_args(tmp_path / "out", corpus, "--max_steps", "8", "--max_eval_samples", "64",
                           "--logging_steps", "4")]
    at = args.index("--train_file")
    args[at:at + 2] = ["--builtin_corpus", "python_docstrings"]
    result = launch_tpu(args, tmp_path / "hf", script=REPO / "tests" / "xla_world_of_two.py")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Process rank 0 of 2, device xla:0" in output
    assert "XLA: every replica starts from replica 0's weights" in output
    tags = json.loads(output.split("RENDEZVOUS ", 1)[1].splitlines()[0])
    assert tags[:4] == ["run_mlm: building the corpus", "run_mlm: training the tokenizer", "run_mlm: tokenizing",
                        "run_mlm: masking the evaluation set"]
    assert "saving_checkpoint" in tags  # transformers' own waits on XLA are rendezvous too
    results = json.loads(output.split("RESULTS ", 1)[1].splitlines()[0])
    assert results["eval_samples"] == 64 and (tmp_path / "out" / "model.safetensors").exists()


@needs_xla
def test_sigterm_on_xla_saves_a_checkpoint_at_an_agreed_step_and_the_rerun_resumes(tmp_path, corpus):
    """Under torch_xla's launcher the run is a worker thread, where Python installs no signal handler; XLA's
    preemption sync manager catches SIGTERM and names the step at which every process stops."""
    import signal
    import time

    import psutil

    out, log = tmp_path / "out", tmp_path / "log.txt"
    args = tiny_run_args(out, corpus, "--max_steps", "100000", "--do_eval", "false", "--save_strategy", "steps",
                         "--save_steps", "10")
    launcher = launch_tpu(args, tmp_path / "hf", log=log)
    try:
        deadline = time.time() + 300
        while not (out / "checkpoint-10" / "trainer_state.json").exists():  # training is under way
            assert launcher.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        workers = psutil.Process(launcher.pid).children(recursive=True)
        assert workers
        for worker in workers:  # a preempted TPU VM signals every process
            worker.send_signal(signal.SIGTERM)
        started = time.time()
        launcher.wait(timeout=300)
    finally:
        for process in psutil.Process(launcher.pid).children(recursive=True) if launcher.poll() is None else []:
            process.kill()
        launcher.kill()
    output = log.read_text()
    assert time.time() - started < 120
    assert "SIGTERM caught" in output  # by XLA's preemption notifier, not the default action
    stopped = re.search(r"SIGTERM at step (\d+): saved", output)
    assert stopped, output[-3000:]
    step = int(stopped.group(1))
    checkpoint = out / f"checkpoint-{step}"
    assert (checkpoint / "model.safetensors").exists() and (checkpoint / "trainer_state.json").exists()
    assert f"saved {out}/checkpoint-{step}; run the same command to resume from it" in output
    assert not (out / "model.safetensors").exists()  # stopped, not finished
    # The same command with a reachable end resumes from the checkpoint.
    at = len(args) - 1 - args[::-1].index("--max_steps")  # the last one given is the one that counts
    args[at + 1] = str(step + 3)
    again = launch_tpu(args, tmp_path / "hf")
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == step + 3
    assert f"checkpoint-{step}" in again.stdout + again.stderr  # resumed from it


@needs_xla
def test_bf16_on_xla_autocasts_and_keeps_fp32_weights(xla_run, tmp_path, corpus):
    out = tmp_path / "out"
    args = xla_args(out, corpus)
    args[args.index("--precision") + 1] = "bf16"
    result = launch_tpu(args, tmp_path / "hf")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Precision: bf16 autocast on XLA, weights and optimizer state in fp32 (not XLA_USE_BF16)" in output
    assert "mixed precision bf16 (autocast, fp32 weights)" in output
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {__import__("torch").float32}
    # The same run in fp32 (the module's xla_run): close, but not the same numbers, so bf16 was in use.
    fp32 = json.loads((xla_run[0] / "all_results.json").read_text())
    bf16 = json.loads((out / "all_results.json").read_text())
    assert bf16["eval_loss"] == pytest.approx(fp32["eval_loss"], abs=0.1)
    assert bf16["train_loss"] != fp32["train_loss"]


@needs_xla
def test_a_time_budget_on_xla_agrees_through_rendezvous_and_changes_the_rate_without_compiling(tmp_path, corpus):
    """--max_train_time on XLA: the clock is agreed every 10 steps through XLA's rendezvous (no torch.distributed
    on a TPU), the learning rate falls over the budget at every step, and no step after warm-up compiles."""
    out = tmp_path / "out"
    args = tiny_run_args(out, corpus, "--max_steps", "-1", "--max_train_time", "40s", "--warmup_steps", "0",
                         "--logging_steps", "5", "--max_eval_samples", "64")
    result = launch_tpu(args, tmp_path / "hf", script=REPO / "tests" / "xla_world_of_two.py")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "time budget: used" in output and "stopped at the deadline" in output
    tags = json.loads(output.split("RENDEZVOUS ", 1)[1].splitlines()[0])
    assert {f"run_mlm: time budget at step {step}" for step in (1, 2, 19, 20, 30, 40)} <= set(tags), tags
    assert "run_mlm: time budget at step 21" not in tags
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    # Agreed at every step while the first steps compile, then every 10: the rate never rises and
    # falls to near 0 at the deadline.
    rates = [entry["learning_rate"] for entry in history if "learning_rate" in entry]
    assert len(rates) >= 10 and all(a >= b for a, b in zip(rates, rates[1:])), rates
    assert rates[-1] < 0.05 * rates[0], rates
    counts = json.loads((out / "xla_compilations.json").read_text())
    assert counts["training_compilations_after_warmup"] == 0, counts
    # Nor any log step after the first: the clock's rendezvous sends a payload of one size
    # (its text form had a new length now and then, a new shape to compile mid-run).
    assert sum(counts["compilations_per_log"][1:]) == 0, counts
