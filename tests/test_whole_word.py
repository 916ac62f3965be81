"""--whole_word_mask end to end: packed blocks and line_by_line, resumed, on two processes."""

import json
import shutil

import numpy as np
import pytest

from run_mlm import main

from .conftest import accelerate_launch, tiny_run_args
from .test_masking import run_args

NO_DROPOUT = ("hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,"
              "max_position_embeddings=64,hidden_dropout_prob=0,attention_probs_dropout_prob=0")


def logged(output_dir, key="loss"):
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {e["step"]: e[key] for e in state["log_history"] if key in e}


def glued_corpus(path, corpus, n_lines=800):
    """The toy corpus with words glued in pairs: unknown to a 120-token vocabulary, so split into pieces."""
    lines = corpus.read_text().splitlines()[:n_lines]
    path.write_text("\n".join(line.replace(" the ", " the").replace(" a ", " a") for line in lines) + "\n")
    return path


@pytest.mark.parametrize("layout", ["packed", "line_by_line"])
def test_whole_word_runs_train(corpus, tmp_path, layout):
    text = glued_corpus(tmp_path / "glued.txt", corpus)
    extra = ["--line_by_line"] if layout == "line_by_line" else []
    metrics = main(tiny_run_args(tmp_path / "out", text, "--whole_word_mask", "--eval_on_start", "true",
                                 "--eval_strategy", "steps", "--eval_steps", "60", *extra))
    evals = logged(tmp_path / "out", "eval_loss")
    assert evals[0] > 4.5 and metrics["eval_loss"] < evals[0] - 0.5
    card = (tmp_path / "out" / "README.md").read_text()
    assert "whole words" in card


def test_whole_word_blocks_carry_word_starts_and_words_are_masked_whole(corpus, tmp_path):
    """The blocks a run trains on, and the masks it draws from them, in the run's own functions."""
    from types import SimpleNamespace

    import torch

    from utils.data.masking import build_collator
    from utils.data.pipeline import load_raw_datasets, preprocess_datasets
    from utils.data.tokenizer import train_wordpiece_tokenizer

    text = glued_corpus(tmp_path / "glued.txt", corpus)
    tokenizer = train_wordpiece_tokenizer(corpus.read_text().splitlines(), vocab_size=120)
    args = SimpleNamespace(dataset_name=None, dataset_config_name=None, train_file=[str(text)], validation_file=None,
                           streaming=False, validation_split_percentage=0, text_column_name=None,
                           whole_word_mask=True, line_by_line=False, pad_to_max_length=False,
                           preprocessing_num_workers=None, overwrite_cache=False, mlm_probability=0.3,
                           mask_replace_prob=0.8, random_replace_prob=0.1, pad_to_multiple_of=None)
    blocks = preprocess_datasets(load_raw_datasets(args, SimpleNamespace(cache_dir=None, token=None)), tokenizer,
                                 args, 32)["train"]
    assert blocks.column_names == ["input_ids", "word_starts"]
    starts = np.array(blocks["word_starts"])
    assert 0.2 < starts.mean() < 0.9  # glued words span several pieces
    collator = build_collator(tokenizer, args, run_args(seed=0))
    rows = [blocks[i] for i in range(64)]
    batch = collator.mask_batch(collator(rows), step=0)
    labelled = (batch["labels"] != -100).numpy()
    # A word is labelled all or nothing (special tokens aside, never labelled); the first token
    # of a block begins a word, the rest of one cut by the block boundary.
    special = torch.isin(torch.tensor([r["input_ids"] for r in rows]), torch.tensor(tokenizer.all_special_ids))
    partial_words = 0
    for r in range(64):
        word = np.cumsum(np.r_[1, starts[r][1:]])
        partial_words += int(starts[r][0] == 0)
        for w in np.unique(word):
            in_word = (word == w) & ~special[r].numpy()
            assert labelled[r][in_word].all() or not labelled[r][in_word].any()
    assert 0.2 < labelled.sum() / (~special.numpy()).sum() < 0.4
    assert partial_words > 0  # some blocks do start inside a word


def test_whole_word_resume_equals_an_uninterrupted_run(corpus, tmp_path):
    text = glued_corpus(tmp_path / "glued.txt", corpus)
    args = ["--whole_word_mask", "--max_steps", "12", "--logging_steps", "1", "--save_strategy", "steps",
            "--save_steps", "6", "--dataloader_num_workers", "2"]
    whole = main(tiny_run_args(tmp_path / "whole", text, *args))
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-6", tmp_path / "resumed" / "checkpoint-6")
    resumed = main(tiny_run_args(tmp_path / "resumed", text, *args))
    assert logged(tmp_path / "resumed") == pytest.approx(logged(tmp_path / "whole"), abs=1e-6)
    assert resumed["eval_loss"] == pytest.approx(whole["eval_loss"], abs=1e-6)


def test_whole_word_on_two_processes_equals_one(corpus, tmp_path):
    text = glued_corpus(tmp_path / "glued.txt", corpus)
    from utils.data.tokenizer import train_wordpiece_tokenizer

    train_wordpiece_tokenizer(corpus.read_text().splitlines(), vocab_size=120).save_pretrained(tmp_path / "tok")

    def args(out, batch):
        a = tiny_run_args(out, text, "--whole_word_mask", "--tokenizer_name", str(tmp_path / "tok"),
                          "--max_steps", "10", "--logging_steps", "5", "--per_device_train_batch_size", str(batch),
                          "--per_device_eval_batch_size", str(batch))
        a[a.index("--config_overrides") + 1] = NO_DROPOUT
        return a

    one = accelerate_launch("accelerate_configs/cpu.yaml", args(tmp_path / "one", 16),
                            env={"HF_HOME": str(tmp_path / "hf1")})
    two = accelerate_launch("accelerate_configs/multi_cpu.yaml", args(tmp_path / "two", 8),
                            env={"HF_HOME": str(tmp_path / "hf2")})
    for result in (one, two):
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert logged(tmp_path / "two") == pytest.approx(logged(tmp_path / "one"), abs=1e-5)
