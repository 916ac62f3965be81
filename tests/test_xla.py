"""The TPU path: `accelerate_configs/tpu.yaml` run for real on torch_xla's CPU backend (PJRT_DEVICE=CPU).

torch_xla lives in its own environment (scripts/setup_xla_env.sh); these tests drive it as
a subprocess and check its output in the main environment. They need RUN_MLM_XLA_PYTHON
(the path the script prints); CI sets it, and RUN_MLM_REQUIRE_XLA=1 turns a missing
environment into a failure instead of a skip.
"""

import importlib.util
import json
import os
import subprocess
import sys

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


@pytest.fixture(scope="module")
def xla_run(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("xla") / "out"
    env = {**os.environ, "PJRT_DEVICE": "CPU", "PYTHONUNBUFFERED": "1",
           "HF_HOME": str(tmp_path_factory.mktemp("xla_hf"))}
    env.pop("ACCELERATE_USE_CPU", None)
    result = subprocess.run(
        [XLA_PYTHON, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs/tpu.yaml"),
         str(REPO / "run_mlm.py"), *xla_args(out, corpus)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out, result


@needs_xla
def test_tpu_config_trains_evaluates_with_accuracy_and_saves(xla_run):
    out, result = xla_run
    output = result.stdout + result.stderr  # under XLA, logs go through torch_xla's stderr handler
    assert "device xla:0" in output
    assert "XLA: set --optim adamw_torch" in output
    assert "XLA: nan/inf gradients are not checked (--nonfinite_loss has no effect on XLA" in output
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
    from utils.xla import nonfinite_check_note

    with pytest.raises(UsageError, match="--nonfinite_loss skip is not supported on XLA"):
        nonfinite_check_note("skip")
    assert "not checked" in nonfinite_check_note("stop")


@needs_xla
def test_downstream_fine_tunes_on_xla(tmp_path, corpus):
    """utils.downstream under the TPU config: classification on torch_xla's CPU backend, static shapes."""
    from transformers import BertConfig, BertForMaskedLM

    from utils.tokenizer import train_wordpiece_tokenizer

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
         "-m", "utils.downstream", "--models", f"tiny={model}", "--train_file", train, "--validation_file", dev,
         "--seeds", "1", "--output_dir", str(tmp_path / "out"), "--learning_rate", "5e-3", "--num_train_epochs", "3",
         "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16", "--max_seq_length", "32",
         "--disable_tqdm", "true"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "device xla:0" in result.stdout + result.stderr
    saved = json.loads((tmp_path / "out" / "downstream_results.json").read_text())
    assert saved["tiny"]["accuracy_mean"] > saved["task"]["majority_accuracy"] + 0.2
