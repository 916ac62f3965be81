"""run_mlm.main() end to end on a tiny model: train, evaluate, save, reload, adapt, resume."""

import json
import logging

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

from run_mlm import main
from utils.errors import UsageError

from .conftest import tiny_run_args, write_repetitive_corpus

SENTENCE = "the cat sees the red ball in the [MASK] ."


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """One from-scratch run, evaluated at the start and every 20 steps, shared by the tests below."""
    out = tmp_path_factory.mktemp("trained") / "out"
    metrics = main(tiny_run_args(out, corpus, "--eval_strategy", "steps", "--eval_steps", "20",
                                 "--eval_on_start", "true", "--fill_mask_sentences", SENTENCE))
    return out, metrics


def eval_losses(output_dir):
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [(e["step"], e["eval_loss"]) for e in state["log_history"] if "eval_loss" in e]


def test_eval_loss_falls(trained):
    out, _ = trained
    losses = eval_losses(out)
    assert [step for step, _ in losses] == [0, 20, 40, 60]
    first, last = losses[0][1], losses[-1][1]
    # Untrained: near uniform over the 120-token vocabulary (ln 120 = 4.8 nats). Trained:
    # at least down to the corpus's unigram entropy (3.9 nats, see conftest).
    assert first > 4.5
    assert last < first - 0.5, losses
    assert all(b < a for (_, a), (_, b) in zip(losses, losses[1:3])), losses


def test_results_hold_the_metrics_users_read(trained):
    out, metrics = trained
    results = json.loads((out / "all_results.json").read_text())
    for key in ("eval_loss", "perplexity", "eval_accuracy", "train_samples", "eval_samples", "train_loss"):
        assert key in results, key
    assert results["perplexity"] == pytest.approx(torch.tensor(results["eval_loss"]).exp().item(), rel=1e-5)
    assert 0.05 < results["eval_accuracy"] <= 1.0  # far above chance (1/120)
    assert metrics["eval_loss"] == results["eval_loss"]
    # The final evaluation scores the same fixed masks as the last in-training one.
    assert results["eval_loss"] == pytest.approx(eval_losses(out)[-1][1], abs=1e-6)


def test_output_reloads_offline_in_safetensors(trained, corpus, tmp_path):
    out, metrics = trained
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= names
    assert "pytorch_model.bin" not in names
    model = AutoModelForMaskedLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer)
    predictions = fill("the cat sees the red ball in the [MASK] .")
    assert len(predictions) == 5
    assert predictions[0]["token_str"] in tokenizer.get_vocab()
    # Evaluating the saved model (same data, seed, hence the same fixed masks) gives back
    # the trained run's eval loss: the weights on disk are the weights that were evaluated.
    args = tiny_run_args(tmp_path / "eval_only", corpus)
    args = ["--model_name_or_path", str(out), *args[args.index("--train_file"):]]
    args.remove("--do_train")
    reloaded = main(args)
    assert reloaded["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-5)


def test_model_card_says_what_was_trained_and_how_to_rerun_it(trained):
    out, metrics = trained
    card = (out / "README.md").read_text()
    assert "pipeline_tag: fill-mask" in card
    assert "trained from scratch" in card and "fine-tuned version of" not in card
    assert "WordPiece, 120 tokens, uncased, trained on the training text" in card
    assert "Steps: 60" in card
    assert f"{metrics['eval_loss']:.4f}" in card and f"{metrics['eval_accuracy']:.4f}" in card
    assert "python run_mlm.py" in card and "run_args.yaml" in card


def test_run_args_file_reruns_the_same_training(trained, tmp_path):
    out, metrics = trained
    saved = (out / "run_args.yaml").read_text()
    # What the user chose, not what the script adjusted for this machine.
    assert "max_steps: 60" in saved and "dataloader_pin_memory" not in saved and "batch_eval_metrics" not in saved
    # The saved args file parses back into the same arguments (output_dir aside).
    rerun = main([str(out / "run_args.yaml"), "--output_dir", str(tmp_path / "rerun")])
    assert rerun["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-6)
    assert rerun["train_loss"] == pytest.approx(metrics["train_loss"], abs=1e-6)


def test_tokens_never_reach_the_output_directory(corpus, tmp_path):
    out = tmp_path / "out"
    main(tiny_run_args(out, corpus, "--max_steps", "2", "--token", "hf_DoNotLeakMe123", "--hub_token",
                       "hf_DoNotLeakMe456"))
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"DoNotLeakMe" not in data, path


def test_fill_mask_sentences_are_printed_at_the_end(trained, capsys, corpus, tmp_path):
    main(tiny_run_args(tmp_path / "out", corpus, "--max_steps", "2", "--fill_mask_sentences", "a [MASK] b",
                       "the <mask> sees"))
    printed = capsys.readouterr().out
    assert "Fill-mask predictions:" in printed
    assert "a [MASK] b\n  -> " in printed and "the <mask> sees\n  -> " in printed


def test_adapt_the_trained_model_to_new_text(trained, tmp_path):
    out, _ = trained
    other = write_repetitive_corpus(tmp_path / "other.txt", n_lines=400, seed=1)
    args = tiny_run_args(tmp_path / "adapted", other, "--max_steps", "10")
    # Replace the from-scratch flags with the pretrained directory.
    cut = args.index("--train_file")
    main(["--model_name_or_path", str(out), *args[cut:], "--eval_on_start", "true",
          "--eval_strategy", "steps", "--eval_steps", "10"])
    first_eval = json.loads((tmp_path / "adapted" / "trainer_state.json").read_text())["log_history"][0]
    assert first_eval["step"] == 0
    assert first_eval["eval_loss"] < 4.3  # starts from the trained weights, not from ln(120) = 4.8
    assert AutoTokenizer.from_pretrained(tmp_path / "adapted").vocab == AutoTokenizer.from_pretrained(out).vocab


def test_line_by_line_run(corpus, tmp_path):
    metrics = main(tiny_run_args(tmp_path / "out", corpus, "--line_by_line", "--max_steps", "5",
                                 "--pad_to_multiple_of", "8"))
    assert metrics["eval_samples"] > 0 and metrics["train_samples"] > 1000  # one example per line


def test_resume_continues_from_the_last_checkpoint(corpus, tmp_path, caplog):
    out = tmp_path / "out"
    saving = ["--save_strategy", "steps", "--save_steps", "10"]
    main(tiny_run_args(out, corpus, "--max_steps", "20", *saving))
    assert (out / "checkpoint-20" / "model.safetensors").exists()
    assert (out / "checkpoint-20" / "tokenizer.json").exists()
    first_state = json.loads((out / "trainer_state.json").read_text())

    # The same command with more steps picks up checkpoint-20 by itself.
    with caplog.at_level(logging.INFO):
        main(tiny_run_args(out, corpus, "--max_steps", "30", *saving))
    assert any("Resuming from" in r.message and "checkpoint-20" in r.message for r in caplog.records)
    # The tied decoder weight and bias, stored once, are not "missing keys" (issue #31).
    assert "missing keys" not in caplog.text
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 30
    # The log of the first 20 steps comes back from the checkpoint unchanged.
    before = [e for e in state["log_history"] if "loss" in e and e["step"] <= 20]
    assert before == [e for e in first_state["log_history"] if "loss" in e]


def test_explicit_resume_from_checkpoint_must_exist(corpus, tmp_path):
    with pytest.raises(UsageError, match="--resume_from_checkpoint .*nope is not a directory"):
        main(tiny_run_args(tmp_path / "out", corpus, "--resume_from_checkpoint", str(tmp_path / "nope")))


def test_bad_length_for_a_pretrained_model_fails_before_writing_anything(trained, corpus, tmp_path):
    out, _ = trained
    args = tiny_run_args(tmp_path / "never", corpus, "--max_seq_length", "100")
    cut = args.index("--train_file")
    with pytest.raises(UsageError, match="--max_seq_length 100 exceeds the 64 positions"):
        main(["--model_name_or_path", str(out), *args[cut:]])
    assert not (tmp_path / "never").exists()


def test_max_predictions_per_seq_caps_the_masks_and_says_how_many_it_left_unmasked(tmp_path, corpus, caplog):
    # As on a TPU with BERT's recipe, here on the CPU: at most 2 predicted tokens per block of 32.
    with caplog.at_level(logging.INFO, logger="run_mlm"):
        metrics = main(tiny_run_args(tmp_path / "out", corpus, "--max_predictions_per_seq", "2", "--max_steps", "10"))
    lines = {r.getMessage().split(":")[0]: r.getMessage() for r in caplog.records if "went over the cap" in
             r.getMessage()}
    assert set(lines) == {"Training masks", "Evaluation masks"}
    dropped, selected = (int(n.replace(",", "")) for n in lines["Training masks"].split()[2:5:2])
    # 15% of 32 tokens is 4.8 a block: well over half of the selection is dropped by a cap of 2.
    assert 0.4 < dropped / selected < 0.8, lines
    assert "cap of 2 predictions per block (--max_predictions_per_seq)" in lines["Training masks"]
    assert metrics["eval_loss"] > 0


def test_the_saved_model_is_readable_like_every_other_file_of_the_run(corpus, tmp_path):
    # safetensors 0.8 writes model.safetensors readable by its owner only (0600) where the run's
    # other files are 0644 (umask 022): another user, or a node with another uid on shared
    # storage, could not load the model (issue #31).
    import os
    import stat

    out = tmp_path / "out"
    main(tiny_run_args(out, corpus, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2",
                       "--do_eval", "false"))
    for folder in (out, out / "checkpoint-4"):
        config_mode = stat.S_IMODE(os.stat(folder / "config.json").st_mode)
        assert config_mode & 0o044  # the usual, group/other-readable mode of this machine's umask
        assert stat.S_IMODE(os.stat(folder / "model.safetensors").st_mode) == config_mode, folder


def test_a_directory_as_train_file_says_so_and_how_to_name_its_files(corpus, tmp_path):
    # Before: "unsupported extension (none)" (issue #31). The suggested pattern then works.
    from utils.data.pipeline import resolve_data_files

    folder = corpus.parent
    with pytest.raises(UsageError, match=r"--train_file .* is a directory; name its files, for example "
                                         r"--train_file \".*/\*\.txt\"") as refused:
        main(tiny_run_args(tmp_path / "out", folder))
    assert "\n" not in str(refused.value)
    suggested = str(refused.value).split('for example --train_file "')[1].split('"')[0]
    assert resolve_data_files([suggested], "train_file") == ("text", [str(corpus)])


def test_the_log_opens_with_a_readable_summary(corpus, tmp_path, caplog):
    # Issue #31: "WARNING run_mlm: Process rank 0 of 1 ..." on every run read as a problem, and
    # the arguments were two dataclass dumps of a few thousand characters on one line each.
    with caplog.at_level(logging.INFO):
        main(tiny_run_args(tmp_path / "out", corpus, "--max_steps", "2", "--do_eval", "false", "--token",
                           "hf_SECRET123"))
    summary = [r for r in caplog.records if r.getMessage().startswith("Process rank 0 of 1, device cpu")]
    assert len(summary) == 1 and summary[0].levelname == "INFO"
    arguments = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Arguments (the others")]
    assert len(arguments) == 1
    lines = arguments[0].splitlines()[1:]
    assert "  max_steps: 2" in lines and "  model_type: bert" in lines and f"  train_file: ['{corpus}']" in lines
    assert all(len(line) < 200 for line in lines) and "  do_train: True" in lines
    assert "ModelArguments(" not in caplog.text and "DataTrainingArguments(" not in caplog.text
    # Issue #30: what the script changed in the parsed arguments, listed once, each with why,
    # and saved with every effective value.
    changed = arguments[0].split("Set by this script (saved in effective_args.json):\n")[1].splitlines()
    assert "  remove_unused_columns: True -> False (the MLM pipeline (utils.train.trainer.adjust_training_args))" \
        in changed
    saved = json.loads((tmp_path / "out" / "effective_args.json").read_text())
    assert saved["changed_by_this_script"] == [line[2:] for line in changed]
    assert saved["TrainingArguments"]["remove_unused_columns"] is False and saved["TrainingArguments"]["max_steps"] == 2
    assert saved["ModelArguments"]["model_type"] == "bert" and "DownstreamCheckArguments" in saved
    assert "hf_SECRET123" not in (tmp_path / "out" / "effective_args.json").read_text() + caplog.text


def test_a_block_longer_than_the_models_positions_is_refused_before_any_tokenizer_is_trained(corpus, tmp_path,
                                                                                             monkeypatch):
    # Issue #31: from scratch with max_position_embeddings set in --config_overrides, the
    # refusal came only after the corpus was read and a tokenizer trained and cached.
    from utils.data import pipeline as data_pipeline
    from utils.data import tokenizer
    def never(*args, **kwargs):
        raise AssertionError("work was done before the length check")

    monkeypatch.setattr(tokenizer, "load_or_train_tokenizer", never)
    monkeypatch.setattr(data_pipeline, "load_text", never)
    with pytest.raises(UsageError, match=r"--max_seq_length 100000 exceeds the 64 positions this bert model has; "
                                         r"use --max_seq_length 64 or less or raise max_position_embeddings"):
        main(tiny_run_args(tmp_path / "out", corpus, "--max_seq_length", "100000"))
    assert not (tmp_path / "out").exists()


def test_whole_texts_longer_than_the_model_raise_no_indexing_warning(tmp_path, capfd, caplog):
    # Texts are tokenized whole on purpose (then packed into blocks): transformers' "Token
    # indices sequence length is longer than the specified maximum ... indexing errors" only
    # alarms users (issue #31).
    lines = write_repetitive_corpus(tmp_path / "short.txt").read_text().splitlines()
    long = tmp_path / "long.txt"
    long.write_text("\n".join(" ".join(lines[i:i + 12]) for i in range(0, len(lines), 12)) + "\n")
    with caplog.at_level(logging.INFO):
        main(tiny_run_args(tmp_path / "out", long, "--max_steps", "2"))
    output = "".join(capfd.readouterr()) + caplog.text
    assert "Token indices sequence length" not in output
    assert "unknown tokens on held-out text" in caplog.text  # the whole held-out texts were tokenized
