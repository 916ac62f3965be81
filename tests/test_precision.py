"""--precision: bf16 where the hardware has it, explicit choices, and contradictions."""

import os
from unittest import mock

import pytest
from transformers import TrainingArguments

from utils.errors import UsageError
from utils.train import precision


def args(**kwargs):
    return TrainingArguments(output_dir="unused", report_to="none", use_cpu=True, **kwargs)


def test_auto_keeps_fp32_on_a_device_without_bf16_units():
    a = args()
    with mock.patch.object(precision, "native_bf16", return_value=(False, "cpu device")):
        assert precision.apply_precision(a, "auto") == "no"
    assert not a.bf16 and a.mixed_precision == "no"


def test_auto_turns_bf16_on_where_the_hardware_has_it():
    a = args()
    with mock.patch.object(precision, "native_bf16", return_value=(True, "XLA device TPU")):
        assert precision.apply_precision(a, "auto") == "bf16"
    assert a.bf16 and a.mixed_precision == "bf16"


def test_auto_keeps_what_the_accelerate_config_chose():
    with mock.patch.dict(os.environ, {"ACCELERATE_MIXED_PRECISION": "fp16"}):
        a = args()
    with mock.patch.object(precision, "native_bf16", return_value=(True, "gpu")):
        assert precision.apply_precision(a, "auto") == "fp16"


def test_explicit_choices_and_contradictions():
    a = args()
    assert precision.apply_precision(a, "fp32") == "no"
    assert precision.apply_precision(args(bf16=True), "bf16") == "bf16"
    with pytest.raises(UsageError, match="--precision fp32 contradicts --bf16"):
        precision.apply_precision(args(bf16=True), "fp32")


def test_cpu_auto_takes_bf16_only_where_its_matmuls_are_clearly_faster(tmp_path, caplog):
    """The measured rates decide, not the CPU flags: AMX-like rates give bf16, AVX512-BF16-like rates fp32."""
    import logging

    shapes = [(2048, 384, 1536)]
    for case, (rates, expected) in enumerate((({"bfloat16": 2385.0, "float32": 307.0}, "bf16"),   # AMX: 7.8x
                            ({"bfloat16": 194.0, "float32": 314.0}, "no"),      # AVX512-BF16 only: 0.62x
                            ({"bfloat16": 330.0, "float32": 300.0}, "no"))):    # a wash: autocast's casts lose
        a = args()
        with mock.patch.object(precision, "native_bf16", return_value=(True, "this CPU")), \
                mock.patch.object(precision, "matmul_rates", return_value=rates), \
                caplog.at_level(logging.INFO, logger="utils.train.precision"):
            assert precision.apply_precision(a, "auto", shapes, tmp_path / str(case)) == expected
        assert a.bf16 == (expected == "bf16")
        line = caplog.records[-1].getMessage()
        assert f"bf16 matmul runs at {rates['bfloat16']:.0f} GFLOP/s and fp32 at {rates['float32']:.0f}" in line


def test_the_timing_is_cached_per_cpu_and_shape(tmp_path):
    measured = []

    def fake_rates(shapes):
        measured.append(shapes)
        return {"bfloat16": 100.0, "float32": 200.0}

    with mock.patch.object(precision, "matmul_rates", side_effect=fake_rates):
        first = precision.cpu_precision([(64, 32, 32)], tmp_path)
        again = precision.cpu_precision([(64, 32, 32)], tmp_path)
        other = precision.cpu_precision([(64, 32, 64)], tmp_path)
    assert len(measured) == 2 and first[0] == again[0] == other[0] == "no"
    assert "measured in" in first[2] and "cached" in again[2] and "measured earlier" in again[2]


def test_real_timing_measures_both_rates_and_decides_by_them(tmp_path):
    # The choice follows the measured rates (before, `chosen in ("bf16", "no")` could not fail).
    chosen, rates, origin = precision.cpu_precision(precision.gemm_shapes(
        type("C", (), {"hidden_size": 64, "intermediate_size": 256})(), 512), tmp_path)
    assert rates["bfloat16"] > 0 and rates["float32"] > 0 and "measured in" in origin
    assert chosen == ("bf16" if rates["bfloat16"] >= precision.BF16_MARGIN * rates["float32"] else "no")


def test_bf16_trains_end_to_end_on_a_cpu(corpus, tmp_path):
    # The default on AMX machines (--precision auto picks it there); every other run pins fp32.
    import json
    import math

    import torch
    from safetensors.torch import load_file

    from run_mlm import main

    from .conftest import tiny_run_args

    out = tmp_path / "out"
    results = main(tiny_run_args(out, corpus, "--precision", "bf16", "--max_steps", "40", "--logging_steps", "5"))
    losses = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert losses[-1] < losses[0] - 0.3, losses  # it learns
    assert math.isfinite(results["eval_loss"]) and results["eval_loss"] < math.log(120)
    assert "- Precision: bf16 mixed." in (out / "README.md").read_text()
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.float32}
