"""Whole runs of what the other tests pin down: the defaults (no --precision fp32), gradient accumulation,
the dense head, a vocabulary beyond 16-bit ids, and two processes with dropout and the defaults on."""

import json
import logging
import math
import os
import re

import numpy as np
import pytest
from transformers import AutoTokenizer

from run_mlm import main
from utils.data.tokenizer import train_wordpiece_tokenizer
from utils.train.precision import native_bf16

from .conftest import accelerate_launch, tiny_run_args

NO_DROPOUT = ("hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,"
              "max_position_embeddings=64,hidden_dropout_prob=0,attention_probs_dropout_prob=0")


def defaults(args):
    """tiny_run_args without its `--precision fp32`: the precision and CPU kernels a user gets."""
    i = args.index("--precision")
    return args[:i] + args[i + 2:]


def logged(output_dir, key="loss"):
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {e["step"]: e[key] for e in state["log_history"] if key in e}


def test_the_defaults_train(corpus, tmp_path, caplog):
    import torch

    with caplog.at_level(logging.INFO):
        metrics = main(defaults(tiny_run_args(tmp_path / "out", corpus, "--eval_on_start", "true",
                                              "--eval_strategy", "steps", "--eval_steps", "30")))
    messages = " ".join(r.getMessage() for r in caplog.records)
    # The precision --precision auto picks on this machine (timed where the CPU has bf16
    # units; for this tiny model fp32 wins even on AMX), and the CPU kernels, were used.
    if native_bf16(torch.device("cpu"))[0]:
        chosen = re.search(r"Precision: (bf16 mixed precision|fp32) \(on .*?bf16 matmul runs at", messages)
        assert chosen, messages
        expected = "bf16" if chosen.group(1).startswith("bf16") else "no"
    else:
        expected = "no"
    assert f"mixed precision {expected}" in messages
    assert "CPU: " in messages and "MLM head: sparse" in messages
    evals = logged(tmp_path / "out", "eval_loss")
    assert evals[0] > 4.5 and metrics["eval_loss"] < evals[0] - 0.5  # from ln(120) = 4.8 down
    assert math.isfinite(metrics["train_loss"])


def test_gradient_accumulation_2x8_equals_1x16(corpus, tmp_path):
    def run(name, batch, accumulation):
        args = tiny_run_args(tmp_path / name, corpus, "--max_steps", "12", "--logging_steps", "1",
                             "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps",
                             str(accumulation))
        args[args.index("--config_overrides") + 1] = NO_DROPOUT
        return main(args)

    one = run("1x16", 16, 1)
    two = run("2x8", 8, 2)
    # Same rows per optimizer step, same masks (seed, step, row), the loss averaged over the
    # step's masked tokens: only the order of float sums differs.
    assert logged(tmp_path / "2x8") == pytest.approx(logged(tmp_path / "1x16"), abs=1e-5)
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], abs=1e-5)


def test_dense_head_gives_the_sparse_heads_results(corpus, tmp_path):
    # Without dropout: the sparse path's last layer draws masks for the masked positions only,
    # so with dropout the two runs are equal in distribution, not draw for draw.
    def run(name, *extra):
        args = tiny_run_args(tmp_path / name, corpus, "--max_steps", "20", *extra)
        args[args.index("--config_overrides") + 1] = NO_DROPOUT
        return main(args)

    sparse = run("sparse")
    dense = run("dense", "--sparse_prediction", "false")
    assert logged(tmp_path / "dense") == pytest.approx(logged(tmp_path / "sparse"), abs=1e-4)
    assert dense["eval_loss"] == pytest.approx(sparse["eval_loss"], abs=1e-4)
    assert dense["eval_accuracy"] == pytest.approx(sparse["eval_accuracy"], abs=1e-6)


def test_torch_compile_trains_without_recompiling_every_step(corpus, tmp_path):
    """--torch_compile with the sparse head and last layer: the masked-token count varies every step."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        metrics = main(tiny_run_args(tmp_path / "out", corpus, "--max_steps", "30", "--torch_compile", "true"))
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    losses = logged(tmp_path / "out")
    assert losses[30] < losses[10] - 0.2 and math.isfinite(metrics["eval_loss"])
    # Measured 13 graphs (7 recompilations, all in the first steps, as shapes turn dynamic);
    # recompiling at every step would make over 30.
    assert 0 < graphs <= 20


def test_a_vocabulary_beyond_65536_keeps_its_ids(corpus, tmp_path):
    """Ids above 65535 need uint32 storage: they reach the model as the tokenizer gives them."""
    from transformers import BertTokenizer

    trained = train_wordpiece_tokenizer(corpus.read_text().splitlines(), vocab_size=120, model_max_length=64)
    vocab = dict(trained.get_vocab())
    vocab.update({f"extra{i}": len(vocab) + i for i in range(66_000)})  # whole words of a big WordPiece vocabulary
    tokenizer = BertTokenizer(vocab=vocab, model_max_length=64)
    assert len(tokenizer) > 65_536
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    text = corpus.read_text().splitlines()
    big = [f"{line} extra65999 extra65536" for line in text]
    (tmp_path / "big.txt").write_text("\n".join(big) + "\n")
    args = tiny_run_args(tmp_path / "out", tmp_path / "big.txt", "--tokenizer_name", str(tmp_path / "tokenizer"),
                         "--max_steps", "5", "--save_strategy", "no")
    metrics = main(args)
    assert math.isfinite(metrics["eval_loss"]) and metrics["train_samples"] > 0
    # The blocks the run trained on (the datasets cache) hold the high ids, unchanged.
    from utils.data.pipeline import load_raw_datasets, preprocess_datasets

    data_args = type("A", (), dict(dataset_name=None, dataset_config_name=None, train_file=[str(tmp_path / "big.txt")],
                                   validation_file=None, streaming=False, validation_split_percentage=0,
                                   text_column_name=None, whole_word_mask=False, line_by_line=False,
                                   pad_to_max_length=False, preprocessing_num_workers=None, overwrite_cache=False))()
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    blocks = preprocess_datasets(load_raw_datasets(data_args, type("M", (), dict(cache_dir=None, token=None))()),
                                 reloaded, data_args, 32)["train"]
    assert blocks.features["input_ids"].feature.dtype == "uint32"
    ids = np.array(blocks["input_ids"])
    high = reloaded.convert_tokens_to_ids(["extra65999", "extra65536"])
    assert min(high) > 65_535 and set(high) <= set(ids.ravel().tolist())
    flat = [i for line in big for i in reloaded(line)["input_ids"]]
    assert ids.ravel().tolist() == flat[: ids.size]


def test_two_processes_with_dropout_and_the_defaults(corpus, tmp_path):
    args = defaults(tiny_run_args(tmp_path / "out", corpus, "--max_steps", "30", "--per_device_train_batch_size",
                                  "8", "--eval_on_start", "true", "--eval_strategy", "steps", "--eval_steps", "30"))
    # As accelerate sets it where it counts a host's cores instead of the usable CPUs: 2 threads per process.
    result = accelerate_launch("accelerate_configs/multi_cpu.yaml", args,
                               env={"HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    usable = len(os.sched_getaffinity(0))
    if usable < 4:
        assert (f"CPU: {max(1, usable // 2)} thread{'s' if usable >= 4 else ''} per process ({usable} usable CPUs / "
                "2 processes on this machine; the launcher gave 2") in result.stdout
    lines = re.findall(r"Process (\d) of 2 after training: data checksum (\w+) .*?parameter checksum (\w+)",
                       result.stdout)
    assert len(lines) == 2
    assert lines[0][2] == lines[1][2]  # dropout differs between rows, yet the replicas stay one model
    assert lines[0][1] != lines[1][1]
    evals = logged(tmp_path / "out", "eval_loss")
    assert evals[30] < evals[0] - 0.5
