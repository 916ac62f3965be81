"""The preprocessing pipeline at scale: compact token storage, packing across batches, streaming, prepared data."""

import itertools
import json
import logging
import re
from types import SimpleNamespace

import numpy as np
import pytest

from utils.data.encoding import encode_to_arrays
from utils.data.pipeline import (
    BlockPacker,
    load_raw_datasets,
    preprocess_datasets,
    token_dtype,
)
from utils.data.streaming import _part_generator, iter_blocks, streaming_datasets, take_blocks
from utils.data.tokenizer import train_wordpiece_tokenizer
from utils.errors import UsageError

from .conftest import write_repetitive_corpus

# Texts of varied lengths, so that block boundaries fall inside texts and across batches.
TEXTS = [" ".join(f"word{(i * 7 + j) % 53}" for j in range(3 + i % 17)) for i in range(2500)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece_tokenizer(TEXTS, vocab_size=120, model_max_length=64)


def data_args(**overrides):
    values = dict(dataset_name=None, dataset_config_name=None, train_file=None, validation_file=None,
                  builtin_corpus=None, streaming=False, validation_split_percentage=0, text_column_name=None,
                  whole_word_mask=False, line_by_line=False, pad_to_max_length=False,
                  preprocessing_num_workers=None, overwrite_cache=False, max_seq_length=None,
                  max_train_samples=None, max_eval_samples=None)
    values.update(overrides)
    return SimpleNamespace(**values)


MODEL_ARGS = SimpleNamespace(cache_dir=None, token=None)


def all_ids(tokenizer, texts):
    return np.concatenate([tokenizer(t)["input_ids"] for t in texts])


def test_token_ids_take_the_smallest_type():
    assert token_dtype(30522) == "uint16" and token_dtype(65536) == "uint16"
    assert token_dtype(250002) == "uint32"


def test_fast_encoding_gives_the_tokenizers_ids(tokenizer):
    ids, offsets = encode_to_arrays(TEXTS[:50], tokenizer, "uint16")
    assert ids.dtype == np.uint16 and offsets[-1] == len(ids)
    for i, text in enumerate(TEXTS[:50]):
        assert ids[offsets[i]:offsets[i + 1]].tolist() == tokenizer(text)["input_ids"]


def test_packing_loses_only_the_last_partial_block(tmp_path, tokenizer):
    path = tmp_path / "train.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    args = data_args(train_file=[str(path)])
    stats = {}
    blocks = preprocess_datasets(load_raw_datasets(args, MODEL_ARGS), tokenizer, args, 24, stats=stats)["train"]
    expected = all_ids(tokenizer, TEXTS)
    n = len(expected) // 24
    assert len(blocks) == n and stats["train"]["tokens_lost"] == len(expected) - n * 24 < 24
    assert np.array_equal(np.array(blocks["input_ids"]).reshape(-1), expected[: n * 24])
    assert blocks.features["input_ids"].feature.dtype == "uint16"
    # The reference groups each map batch of 1000 texts alone and drops every batch's tail.
    per_batch = sum(len(all_ids(tokenizer, TEXTS[i:i + 1000])) // 24 for i in range(0, len(TEXTS), 1000))
    assert per_batch < len(blocks)


def test_packer_carries_tokens_between_batches():
    import pyarrow as pa

    packer = BlockPacker(4)
    first = packer.add({"input_ids": pa.array(np.arange(6, dtype=np.uint16))})
    second = packer.add({"input_ids": pa.array(np.arange(6, 11, dtype=np.uint16))})
    assert first["input_ids"].to_pylist() == [[0, 1, 2, 3]]
    assert second["input_ids"].to_pylist() == [[4, 5, 6, 7]]
    assert packer.tokens_left == 3 and packer.carry["input_ids"].to_pylist() == [8, 9, 10]


def test_packed_blocks_are_cached_and_reused(tmp_path, tokenizer):
    path = tmp_path / "train.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    args = data_args(train_file=[str(path)])
    raw = load_raw_datasets(args, MODEL_ARGS)
    first = preprocess_datasets(raw, tokenizer, args, 24)["train"]
    second = preprocess_datasets(raw, tokenizer, args, 24)["train"]
    assert first.cache_files and first.cache_files == second.cache_files
    assert "blocks-" in first.cache_files[0]["filename"]
    other = preprocess_datasets(raw, tokenizer, args, 16)["train"]
    assert other.cache_files != first.cache_files and len(other["input_ids"][0]) == 16


def test_streaming_blocks_equal_the_prepared_blocks(tokenizer):
    stats = {}
    streamed = np.stack(list(iter_blocks(iter(TEXTS), tokenizer, 24, stats=stats)))
    expected = all_ids(tokenizer, TEXTS)
    assert len(streamed) == len(expected) // 24
    assert np.array_equal(streamed.reshape(-1), expected[: len(streamed) * 24])
    assert stats["texts"] == len(TEXTS) and stats["tokens_left"] == len(expected) % 24


def test_stream_parts_split_the_texts_between_processes(tokenizer):
    rows = [{"text": t} for t in TEXTS]
    kwargs = dict(raw=rows, text_column="text", tokenizer=tokenizer, block_size=24, n_parts=2, skip_texts=100,
                  max_blocks=None, passes=1)
    part0 = [b["input_ids"] for b in _part_generator([0], **kwargs)]
    part1 = [b["input_ids"] for b in _part_generator([1], **kwargs)]
    assert np.array_equal(np.concatenate(part0), all_ids(tokenizer, TEXTS[100::2])[: len(part0) * 24])
    assert np.array_equal(np.concatenate(part1), all_ids(tokenizer, TEXTS[101::2])[: len(part1) * 24])


def test_streaming_holds_out_evaluation_blocks_and_shards_training(tmp_path, tokenizer):
    path = tmp_path / "train.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    args = data_args(train_file=[str(path)], streaming=True, max_eval_samples=10)
    raw = load_raw_datasets(args, MODEL_ARGS)
    assert "validation" not in raw  # no len() to cut a percentage from
    train, evaluation = streaming_datasets(raw, tokenizer, args, 24, n_parts=2, do_eval=True)
    assert len(evaluation) == 10
    held_out, used = take_blocks(iter(TEXTS), tokenizer, 24, 10)
    assert np.array_equal(np.array(evaluation["input_ids"]), held_out)
    # accelerate gives each process one shard (dispatch_batches=False): the two parts, disjoint.
    assert train.n_shards == 2
    # A share never ends (it is read again): the first 10 blocks of each.
    rank0 = [tuple(r["input_ids"]) for r in itertools.islice(train.shard(num_shards=2, index=0), 10)]
    rank1 = [tuple(r["input_ids"]) for r in itertools.islice(train.shard(num_shards=2, index=1), 10)]
    first_train_text = tokenizer(TEXTS[used])["input_ids"]
    assert list(rank0[0][: len(first_train_text)]) == first_train_text
    assert rank0[0] != rank1[0] and not set(rank0) & set(rank1)


def test_accelerate_gives_each_process_its_own_part_of_the_stream(tmp_path, tokenizer):
    # What the Trainer's accelerator does with the stream when run_mlm sets dispatch_batches=False.
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    path = tmp_path / "train.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    args = data_args(train_file=[str(path)], streaming=True)
    raw = load_raw_datasets(args, MODEL_ARGS)
    train, _ = streaming_datasets(raw, tokenizer, args, 24, n_parts=2, do_eval=False)
    first_batches = []
    for rank in range(2):
        loader = prepare_data_loader(DataLoader(train, batch_size=4, collate_fn=lambda rows: rows),
                                     num_processes=2, process_index=rank, dispatch_batches=False,
                                     put_on_device=False)
        first_batches.append([tuple(r["input_ids"]) for r in next(iter(loader))])
    # Rank r's first rows are part r's first blocks: texts r, r + 2, r + 4, ...
    for rank, batch in enumerate(first_batches):
        assert np.array_equal(np.concatenate(batch), all_ids(tokenizer, TEXTS[rank::2])[: 4 * 24])


# --- run_mlm end to end: prepared data and streaming ------------------------------------------

def run_args(out, corpus, *extra):
    from .conftest import tiny_run_args

    return tiny_run_args(out, corpus, "--max_steps", "20", *extra)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus):
    from utils.tools.prepare_dataset import main as prepare

    root = tmp_path_factory.mktemp("prepared")
    manifest = prepare(run_args(root / "unused", corpus, "--validation_split_percentage", "10",
                                "--tokenized_dataset_path", str(root / "data")))
    return root / "data", manifest


def test_prepared_dataset_holds_blocks_tokenizer_and_manifest(prepared, corpus):
    path, manifest = prepared
    saved = json.loads((path / "manifest.json").read_text())
    assert saved == manifest and saved["block_size"] == 32 and saved["columns"] == ["input_ids"]
    assert saved["source"]["train_file"] == [str(corpus)]
    from datasets import load_from_disk

    blocks = load_from_disk(str(path))
    assert blocks["train"].features["input_ids"].feature.dtype == "uint16"
    assert len(blocks["train"]) == saved["splits"]["train"]["blocks"] > 100
    assert saved["splits"]["train"]["tokens_lost"] < 32
    assert (path / "tokenizer" / "tokenizer.json").exists()
    assert not [p for p in path.parent.iterdir() if ".tmp" in p.name]  # written under a temporary name


def test_training_from_prepared_data_skips_tokenizing(prepared, corpus, tmp_path, caplog):
    from run_mlm import main

    path, manifest = prepared
    missing = tmp_path / "gone.txt"  # the raw text is not read: the args may even name none
    args = run_args(tmp_path / "out", missing, "--tokenized_dataset_path", str(path))
    args[args.index("--train_file"): args.index("--train_file") + 2] = []
    with caplog.at_level(logging.INFO):
        metrics = main(args)
    assert metrics["eval_samples"] == manifest["splits"]["validation"]["blocks"]
    assert metrics["eval_loss"] < 4.6  # from ~4.8 (uniform over 120 tokens) in 20 steps
    assert "Tokenizing" not in caplog.text and "Training a WordPiece" not in caplog.text


@pytest.mark.parametrize("extra, message", [
    (["--max_seq_length", "16"], r"--max_seq_length 16 differs from the block size 32"),
    (["--tokenizer_name", "OTHER"], r"was tokenized with another tokenizer"),
    (["--train_file", "OTHER"], r"was prepared from other data: --train_file"),
])
def test_prepared_data_that_does_not_fit_the_run_is_refused(prepared, corpus, tmp_path, extra, message):
    from run_mlm import main
    from utils.data.tokenizer import train_wordpiece_tokenizer

    path, _ = prepared
    other_corpus = write_repetitive_corpus(tmp_path / "other.txt", n_lines=50, seed=1)
    if "OTHER" in extra and extra[0] == "--tokenizer_name":
        train_wordpiece_tokenizer(["some other text entirely"] * 10, vocab_size=100).save_pretrained(tmp_path / "t")
        extra = [extra[0], str(tmp_path / "t")]
    elif "OTHER" in extra:
        extra = [extra[0], str(other_corpus)]
    args = run_args(tmp_path / "out", corpus, "--tokenized_dataset_path", str(path))
    if extra[0] == "--train_file":
        args[args.index("--train_file") + 1] = extra[1]
        extra = []
    with pytest.raises(UsageError, match=message):
        main(args + extra)
    assert not (tmp_path / "out").exists()


def test_prepare_refuses_to_overwrite_without_asking(prepared, corpus):
    from utils.tools.prepare_dataset import main as prepare

    path, _ = prepared
    with pytest.raises(UsageError, match="is not empty; pass --overwrite"):
        prepare(run_args(path.parent / "unused", corpus, "--tokenized_dataset_path", str(path)))


def test_missing_prepared_dataset_says_how_to_make_it(corpus, tmp_path):
    from run_mlm import main

    with pytest.raises(UsageError, match=r"does not exist; write it with `python -m utils.tools.prepare_dataset"):
        main(run_args(tmp_path / "out", corpus, "--tokenized_dataset_path", str(tmp_path / "none")))


def test_streaming_run_trains_for_max_steps_and_evaluates_held_out_blocks(corpus, tmp_path):
    from run_mlm import main

    metrics = main(run_args(tmp_path / "out", corpus, "--streaming", "--max_eval_samples", "24"))
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 20
    assert metrics["eval_samples"] == 24 and metrics["train_samples"] == 20 * 16
    assert metrics["eval_loss"] < 4.6 and 0 < metrics["eval_accuracy"] < 1


def test_streaming_needs_max_steps(corpus, tmp_path):
    from run_mlm import main

    args = run_args(tmp_path / "out", corpus, "--streaming")
    for i, arg in enumerate(args[:-1]):
        if arg == "--max_steps":
            args[i + 1] = "-1"  # the Trainer's "not set"
    with pytest.raises(UsageError, match="--streaming needs --max_steps"):
        main(args)


def test_two_processes_stream_different_text(corpus, tmp_path):
    from .conftest import accelerate_launch

    result = accelerate_launch("accelerate_configs/multi_cpu.yaml",
                               run_args(tmp_path / "out", corpus, "--streaming", "--max_eval_samples", "16",
                                        "--per_device_train_batch_size", "8"),
                               env={"HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for rank in (0, 1):
        assert (f"Process {rank} of 2 streams its own share of the training text: texts {rank}, {rank + 2}, "
                f"{rank + 4}, ...") in out
    checksums = re.findall(r"Process (\d) of 2 after training: data checksum (\w+) .*?parameter checksum (\w+)",
                           out)
    assert len(checksums) == 2
    (_, data_0, parameters_0), (_, data_1, parameters_1) = checksums
    assert parameters_0 == parameters_1  # one model
    assert data_0 != data_1  # trained on different text: each process its own share of the stream
    results = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert results["train_samples"] == 20 * 16 and results["eval_samples"] == 16
