"""Bad input fails early in one line and writes nothing; killed, interrupted or diverging runs keep their work."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from run_mlm import main
from utils.data.tokenizer import train_wordpiece_tokenizer
from utils.errors import UsageError
from utils.train.callbacks import NonFiniteGradients, NonFiniteGuard
from utils.train.checkpoints import lock_output_dir, unlock_output_dir

from .conftest import REPO, tiny_run_args


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, corpus):
    """A saved tiny BERT (64 positions) and its tokenizer."""
    path = tmp_path_factory.mktemp("pretrained")
    tokenizer = train_wordpiece_tokenizer(corpus.read_text().splitlines(), vocab_size=120, model_max_length=64)
    tokenizer.save_pretrained(path)
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64)).save_pretrained(path)
    return path


def write(path, data: bytes | str):
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def csv_without_text(tmp):
    return (["--train_file", str(write(tmp / "t.csv", "id,title,body\n1,hi,hello there\n"))],
            r"no 'text' column and 2 string columns in \['id', 'title', 'body'\]; name the column with "
            r"--text_column_name")


def other_runs_checkpoint(tmp, corpus):
    checkpoint = tmp / "out" / "checkpoint-10"
    checkpoint.mkdir(parents=True)
    BertForMaskedLM(BertConfig(vocab_size=120, hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
                               intermediate_size=32, max_position_embeddings=64)).save_pretrained(checkpoint)
    train_wordpiece_tokenizer(corpus.read_text().splitlines(), vocab_size=120).save_pretrained(checkpoint)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 10, "log_history": []}))
    return [], r"holds checkpoints of another model \(checkpoint-10: hidden_size 16 there, 32 here"


def no_mask_tokenizer(tmp, corpus):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(corpus.read_text().splitlines(), trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp / "nomask")
    return ["--tokenizer_name", str(tmp / "nomask")], r"has no mask token"


# (case, builder(tmp, corpus, pretrained) -> (extra args, message regex)); the extra args replace --train_file when
# they name one.
BAD_INPUT = {
    "missing file": lambda t, c, p: (["--train_file", str(t / "nope.txt")], r"--train_file .*nope.txt does not exist"),
    "empty file": lambda t, c, p: (["--train_file", str(write(t / "e.txt", ""))], r"--train_file .*e.txt is empty"),
    "only blank lines": lambda t, c, p: (["--train_file", str(write(t / "b.txt", "\n \n\t\n\n"))],
                                         r"the train text is blank: every row of --train_file .*b.txt"),
    "shorter than one block": lambda t, c, p: (["--train_file", str(write(t / "s.txt", "a cat sees\na dog runs\n"))],
                                               r"fewer tokens than one block of 32 \(--max_seq_length\)"),
    "unsupported extension": lambda t, c, p: (["--train_file", str(write(t / "d.docx", "x"))],
                                              r"unsupported extension \.docx; use one of \.txt"),
    "csv without the text column": lambda t, c, p: csv_without_text(t),
    "undecodable bytes": lambda t, c, p: (
        ["--train_file", str(write(t / "u.txt", c.read_bytes()[:2000] + b"caf\xe9 au lait\n"))],
        r"u.txt: bytes that are not UTF-8 at line \d+ .*--encoding_errors replace"),
    "malformed args file": lambda t, c, p: ([str(write(t / "a.yaml", "learning_rate: [1e-4\n"))], r"a.yaml"),
    "unknown key in args file": lambda t, c, p: ([str(write(t / "k.yaml", "learnig_rate: 1e-4\n"))],
                                                 r"unknown key 'learnig_rate'.*learning_rate"),
    "contradictory flags": lambda t, c, p: (["--pad_to_max_length"], r"--pad_to_max_length only applies with "
                                                                      r"--line_by_line"),
    "sequence beyond the model's positions": lambda t, c, p: (
        ["--model_name_or_path", str(p), "--max_seq_length", "128"], r"--max_seq_length 128.*64"),
    "tokenizer without a mask token": lambda t, c, p: no_mask_tokenizer(t, c),
    "model neither a directory nor reachable": lambda t, c, p: (["--model_name_or_path", "no-such-org/no-model"],
                                                                r"no-such-org/no-model.*offline|HF_HUB_OFFLINE"),
    "mlm_probability outside (0, 1)": lambda t, c, p: (["--mlm_probability", "1.5"],
                                                       r"--mlm_probability 1.5 must be between 0 and 1"),
    "output_dir with another model's checkpoints": lambda t, c, p: other_runs_checkpoint(t, c),
    "pickled weights without --allow_pickle_weights": lambda t, c, p: pickled_only(t, p),
}


def pickled_only(tmp, pretrained):
    import shutil

    path = tmp / "pickled"
    shutil.copytree(pretrained, path)
    model = BertForMaskedLM.from_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    return ["--model_name_or_path", str(path)], r"pass --allow_pickle_weights"


def build_args(out, corpus, extra):
    args = tiny_run_args(out, corpus)
    if extra and extra[0].endswith((".yaml", ".json")):  # an args file goes first
        return [extra[0], *args]
    if "--train_file" in extra:
        i = args.index("--train_file")
        del args[i:i + 2]
    if "--model_name_or_path" in extra:  # a pretrained model, not one from a config
        i = args.index("--model_type")
        del args[i:i + 4]
        del args[args.index("--tokenizer_vocab_size"):args.index("--tokenizer_vocab_size") + 2]
    if "--max_seq_length" in extra:
        i = args.index("--max_seq_length")
        del args[i:i + 2]
    return args + extra


def listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else None


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_fails_in_one_line_before_writing(case, tmp_path, corpus, pretrained):
    extra, message = BAD_INPUT[case](tmp_path, corpus, pretrained)
    out = tmp_path / "out"
    before = listing(out)
    with pytest.raises(UsageError, match=message) as error:
        main(build_args(out, corpus, extra))
    assert "\n" not in str(error.value)
    assert listing(out) == before  # nothing new in the output directory
    print(f"\n| {case} | {error.value} |")  # the README's table, with -s


def test_bad_input_on_the_command_line_exits_2_without_traceback(tmp_path, corpus):
    bad = write(tmp_path / "u.txt", b"fine\n\xff\xfe broken\n")
    result = subprocess.run([sys.executable, str(REPO / "run_mlm.py"), *build_args(tmp_path / "out", corpus,
                                                                                   ["--train_file", str(bad)])],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "u.txt: bytes that are not UTF-8 at line 2" in errors[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_awkward_but_valid_text_trains(tmp_path, corpus):
    lines = corpus.read_text().splitlines()
    text = ("\ufeff" + "\r\n".join(lines[:300]) + "\r" + "\n".join(lines[300:600]) + "\n"  # BOM, CRLF, CR, LF
            + "Η γάτα βλέπει την μπάλα. 猫はボールを見る。 Кошка видит мяч. القطة ترى الكرة\n" * 50
            + " ".join(lines[600:]) * 400 + "\n")  # one line of ~10 MB without a newline
    path = tmp_path / "awkward.txt"
    path.write_text(text, encoding="utf-8")
    assert max(len(line) for line in text.split("\n")) > 10_000_000
    metrics = main(tiny_run_args(tmp_path / "out", path, "--max_steps", "5"))
    assert metrics["train_samples"] > 1000 and metrics["eval_loss"] > 0


def test_undecodable_bytes_can_be_replaced(tmp_path, corpus):
    path = write(tmp_path / "u.txt", corpus.read_bytes() + b"caf\xe9 au lait\n")
    metrics = main(tiny_run_args(tmp_path / "out", path, "--max_steps", "2", "--encoding_errors", "replace"))
    assert metrics["train_samples"] > 0


def test_a_second_run_on_the_same_output_dir_is_refused(tmp_path, corpus):
    out = tmp_path / "out"
    lock_output_dir(str(out))  # as if another run were training there
    try:
        with pytest.raises(UsageError, match=r"--output_dir .*out is in use by another run \(pid \d+"):
            main(tiny_run_args(out, corpus, "--max_steps", "2"))
    finally:
        unlock_output_dir(str(out))
    main(tiny_run_args(out, corpus, "--max_steps", "2"))  # free again
    assert not (out / ".run_mlm.lock").exists()


def diverging_args(out, corpus, *extra):
    # A learning rate this large makes the weights overflow within a few steps.
    return tiny_run_args(out, corpus, "--learning_rate", "1e30", "--max_grad_norm", "0", "--warmup_steps", "0",
                         "--max_steps", "30", *extra)


def test_nonfinite_loss_stops_with_the_step_and_releases_the_run(tmp_path, corpus):
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    out = tmp_path / "out"
    with pytest.raises(NonFiniteGradients, match=r"became nan/inf at step (\d+); stopped before applying it \(the "
                                                  r"last good checkpoint is .*checkpoint-\d+\)"):
        main(diverging_args(out, corpus, "--save_steps", "1", "--save_strategy", "steps"))
    assert not (out / "model.safetensors").exists()  # no final model that looks finished
    # Nothing of the failed run is left behind in this process: its lock and its signal handlers.
    assert {signum: signal.getsignal(signum) for signum in handlers} == handlers
    assert not (out / ".run_mlm.lock").exists() and not (out / ".run_mlm.owner").exists()
    lock_output_dir(str(out))  # free for the next run
    unlock_output_dir(str(out))


def test_nonfinite_loss_skip_keeps_bad_steps_out_of_the_weights(tmp_path, caplog):
    from safetensors.torch import load_file

    from .conftest import write_repetitive_corpus

    corpus = write_repetitive_corpus(tmp_path / "c.txt", n_lines=600)
    with caplog.at_level("WARNING", logger="utils.train.trainer"):
        main(diverging_args(tmp_path / "skip", corpus, "--nonfinite_loss", "skip", "--do_eval", "false"))
    skipped = [r.getMessage() for r in caplog.records if "non-finite gradients" in r.getMessage()]
    # Step 1 applies a huge but finite update; every later step overflows and is skipped.
    assert len(skipped) == 29 and skipped[-1].endswith("(29 skipped so far)")
    weights = load_file(str(tmp_path / "skip" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert max(w.abs().max().item() for w in weights.values()) > 1e20  # the step-1 update did go in


@pytest.mark.parametrize("handed_norm", [False, True])
def test_nonfinite_guard_judges_by_the_gradients_or_the_trainers_norm(handed_norm):
    """The Trainer's total norm (handed over by MLMTrainer) or, without it, the gradients themselves."""
    from types import SimpleNamespace

    model = torch.nn.Linear(3, 2)
    state = SimpleNamespace(global_step=4)
    args = SimpleNamespace(output_dir="/nonexistent")
    guard = NonFiniteGuard("skip")
    for value, finite in ((1.0, True), (float("inf"), False), (float("nan"), False)):
        model.weight.grad = torch.full((2, 3), value)
        model.bias.grad = torch.ones(2)
        if handed_norm:  # what the Trainer computed for clipping and logging, once per step
            guard.grad_norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
        guard.on_pre_optimizer_step(args, state, None, model=model)
        assert (model.weight.grad is not None) == finite and guard.grad_norm is None
    assert guard.skipped == 2


def test_a_diverging_run_exits_3_with_one_line(tmp_path, corpus):
    result = subprocess.run([sys.executable, str(REPO / "run_mlm.py"), *diverging_args(tmp_path / "out", corpus)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("diverged:")]
    assert len(lines) == 1 and "became nan/inf at step" in lines[0]
    assert "Traceback" not in result.stderr


def run_cli(args, **kwargs):
    return subprocess.Popen([sys.executable, str(REPO / "run_mlm.py"), *map(str, args)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kwargs)


def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes(tmp_path, corpus):
    args = tiny_run_args(tmp_path / "out", corpus, "--max_steps", "100000", "--logging_steps", "1")
    process = run_cli(args)
    for line in process.stdout:  # wait for training to be under way
        if "'loss'" in line:
            break
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-2000:]
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped:")]
    assert len(stopped) == 1 and "SIGTERM at step" in stopped[0] and "run the same command" in stopped[0]
    step = int(stopped[0].split("step ")[1].split(":")[0])
    assert (tmp_path / "out" / f"checkpoint-{step}" / "trainer_state.json").exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()
    resumed = run_cli(tiny_run_args(tmp_path / "out", corpus, "--max_steps", str(step + 5)))
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-2000:]
    assert f"Resuming from {tmp_path / 'out'}/checkpoint-{step}" in stderr + stdout
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == step + 5


def test_kill_9_during_a_save_resumes_to_the_same_result(tmp_path, corpus):
    def args(out):
        return tiny_run_args(out, corpus, "--max_steps", "40", "--save_strategy", "steps", "--save_steps", "10",
                             "--logging_steps", "5")

    whole = run_cli(args(tmp_path / "whole"))
    whole.communicate(timeout=300)
    assert whole.returncode == 0

    out = tmp_path / "killed"
    victim = run_cli(args(out))
    deadline = time.time() + 300
    while not (out / "checkpoint-20").exists():  # the moment its second save begins
        assert victim.poll() is None and time.time() < deadline
        time.sleep(0.002)
    victim.kill()
    victim.communicate()
    complete = (out / "checkpoint-20" / "trainer_state.json").exists()

    started = time.time()
    resumed = run_cli(args(out))
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-2000:]
    expected = "checkpoint-20" if complete else "checkpoint-10"
    assert f"Resuming from {out}/{expected}" in stdout + stderr
    if not complete:
        assert "Skipping" in stdout + stderr and "checkpoint-20: incomplete" in stdout + stderr
    final = json.loads((out / "all_results.json").read_text())["eval_loss"]
    reference = json.loads((tmp_path / "whole" / "all_results.json").read_text())["eval_loss"]
    print(f"kill -9 at the checkpoint-20 save ({'complete' if complete else 'incomplete'}); resumed from "
          f"{expected} in {time.time() - started:.1f} s total; eval loss {final:.7f} vs uninterrupted {reference:.7f}")
    assert final == pytest.approx(reference, abs=1e-5)
    # The same logged losses after the resume point as without the interruption.
    def losses(path):
        state = json.loads((path / "trainer_state.json").read_text())
        return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}

    resumed_losses, whole_losses = losses(out), losses(tmp_path / "whole")
    for step in (25, 30, 35, 40):
        assert resumed_losses[step] == pytest.approx(whole_losses[step], abs=1e-5)


@pytest.mark.parametrize("suffix", ["", ".gz", ".bz2", ".xz"])
def test_undecodable_bytes_are_located_in_the_text_not_the_compressed_file(tmp_path, suffix):
    import bz2
    import gzip
    import lzma

    from utils.data.pipeline import find_undecodable

    text = b"line one\nline two\n" * 100_000 + b"caf\xc3x\n"  # past the first 1 MB read
    opener = {"": open, ".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}[suffix]
    with opener(tmp_path / f"u.txt{suffix}", "wb") as f:
        f.write(text)
    line, offset, _ = find_undecodable(str(tmp_path / f"u.txt{suffix}"))
    assert (line, offset) == (200_001, len(text) - 3)
