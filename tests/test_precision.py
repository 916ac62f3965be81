"""--precision: bf16 where the hardware has it, explicit choices, and contradictions."""

import os
from unittest import mock

import pytest
from transformers import TrainingArguments

from utils import precision
from utils.errors import UsageError


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
