"""The output directory and its checkpoints: the one a run resumes from (refusing one of another model), the lock that
keeps a second run out, and the final model saved so that no reader sees half a file."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re

from utils.errors import UsageError

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# The config fields that make two models different models (not just another run of one).
_SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "intermediate_size", "max_position_embeddings", "dim", "n_layers", "n_heads", "embedding_size")


def is_complete(checkpoint: str) -> bool:
    """Whether a checkpoint directory was fully written.

    The Trainer writes trainer_state.json last: a run killed while saving leaves a
    directory without it (or with half of it), which must not be resumed from.
    """
    state = os.path.join(checkpoint, "trainer_state.json")
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if not os.path.isfile(state) or not any(os.path.exists(os.path.join(checkpoint, w)) for w in weights):
        return False
    try:
        with open(state) as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return True


def match_weight_file_modes(folder: str) -> None:
    """Give the weight files of `folder` the permissions of its config.json.

    safetensors (0.8) writes `model.safetensors` readable by its owner only (0600), while
    every other file of a run gets the usual mode (0644 under umask 022): on storage shared
    by several nodes or users, the model would then not load for anyone else.
    """
    config = os.path.join(folder, "config.json")
    if not os.path.isfile(config):
        return
    mode = os.stat(config).st_mode & 0o777
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.endswith((".safetensors", ".safetensors.index.json")) and os.stat(path).st_mode & 0o777 != mode:
            os.chmod(path, mode)


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest fully written checkpoint-N in `output_dir`; incomplete ones are logged and skipped."""
    steps = sorted(((int(m.group(1)), name) for name in os.listdir(output_dir)
                    if (m := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))),
                   reverse=True)
    for _, name in steps:
        path = os.path.join(output_dir, name)
        if is_complete(path):
            return path
        logger.warning("Skipping %s: incomplete (the run was stopped while saving it)", path)
    return None


def find_resume_checkpoint(training_args) -> str | None:
    """The checkpoint to resume from: --resume_from_checkpoint, else the newest complete one in output_dir.

    Rerunning the same command after an interruption therefore continues where it stopped.
    """
    path = training_args.resume_from_checkpoint
    if path and path.lower() != "true":
        if not os.path.isdir(path):
            raise UsageError(f"--resume_from_checkpoint {path} is not a directory")
        if not is_complete(path):
            raise UsageError(f"--resume_from_checkpoint {path} is incomplete (no readable trainer_state.json or "
                             "weights: it was being saved when the run stopped); pick an earlier checkpoint")
        return path
    last = None
    if training_args.do_train and os.path.isdir(training_args.output_dir):
        last = last_complete_checkpoint(training_args.output_dir)
    if last is None and path:  # "true": resume from the newest checkpoint in output_dir
        raise UsageError(f"--resume_from_checkpoint true: --output_dir {training_args.output_dir} holds no checkpoint")
    if last is not None:
        logger.info("Resuming from %s (found in --output_dir; use another --output_dir to start over)", last)
    return last


def check_checkpoint_fits(checkpoint: str | None, config, output_dir: str) -> None:
    """Refuse to resume a checkpoint of another model (an output_dir reused for a different run)."""
    if checkpoint is None or not os.path.isfile(os.path.join(checkpoint, "config.json")):
        return
    with open(os.path.join(checkpoint, "config.json")) as f:
        saved = json.load(f)
    differences = [f"{key} {saved[key]} there, {getattr(config, key)} here" for key in _SHAPE_KEYS
                   if key in saved and getattr(config, key, None) is not None and saved[key] != getattr(config, key)]
    if differences:
        raise UsageError(f"--output_dir {output_dir} holds checkpoints of another model ({os.path.basename(checkpoint)}"
                         f": {'; '.join(differences)}); use a new --output_dir, or delete its checkpoints to start "
                         "over")


LOCK_FILE = ".run_mlm.lock"
OWNER_FILE = ".run_mlm.owner"
_held_locks: dict[str, object] = {}  # output_dir -> its FileLock, held for the life of the run


def lock_output_dir(output_dir: str) -> None:
    """Take an exclusive lock on `output_dir`, or stop if another run holds it.

    Two runs writing the same checkpoints would corrupt each other. The lock is an OS file
    lock (`filelock`: flock on Linux/macOS, msvcrt on Windows), released when the process
    ends, however it ends, so a killed run never leaves a stale lock behind. Who holds it
    is written beside it, for the message the second run prints.
    """
    import socket
    import time

    from filelock import FileLock, Timeout

    os.makedirs(output_dir, exist_ok=True)
    lock = FileLock(os.path.join(output_dir, LOCK_FILE), timeout=0)
    owner_file = os.path.join(output_dir, OWNER_FILE)
    try:
        lock.acquire()
    except Timeout:
        try:
            with open(owner_file, encoding="utf-8") as f:
                owner = f.read().strip()
        except OSError:
            owner = ""
        raise UsageError(f"--output_dir {output_dir} is in use by another run ({owner or 'another process'}); wait "
                         "for it to finish, or give this run another --output_dir") from None
    except OSError as e:  # no file locks on this filesystem
        logger.warning("Cannot lock --output_dir %s (%s); make sure no other run writes to it", output_dir, e)
        return
    with open(owner_file, "w", encoding="utf-8") as f:
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    _held_locks[os.path.abspath(output_dir)] = lock


def unlock_output_dir(output_dir: str) -> None:
    """Release the lock on `output_dir` taken by this process, and remove its files."""
    lock = _held_locks.pop(os.path.abspath(output_dir), None)
    if lock is None:
        return
    for name in (OWNER_FILE, LOCK_FILE):
        try:
            os.unlink(os.path.join(output_dir, name))
        except OSError:
            pass
    lock.release()


@contextlib.contextmanager
def locked_output_dir(output_dir: str, enabled: bool = True):
    """`lock_output_dir` for the duration of the block (no-op when not `enabled`), released on any exit."""
    if not enabled:
        yield
        return
    lock_output_dir(output_dir)
    try:
        yield
    finally:
        unlock_output_dir(output_dir)


def finished_run(training_args, max_train_time: float | None) -> str | None:
    """The one line to print when `output_dir` holds a run that already reached its end; else None.

    A rerun of the same command would otherwise resume from the last checkpoint and take one
    step past the end (the Trainer does that for a checkpoint at max_steps), then rewrite the
    results and the card with that one step's figures. A larger --max_steps (or time budget,
    or epochs) continues the run instead.
    """
    out = training_args.output_dir
    state_file, results_file = os.path.join(out, "trainer_state.json"), os.path.join(out, "train_results.json")
    if not training_args.do_train or training_args.resume_from_checkpoint or not os.path.isfile(results_file):
        return None
    try:
        with open(state_file) as f:
            state = json.load(f)
        with open(results_file) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return None
    step = state.get("global_step", 0)
    newest = last_complete_checkpoint(out)
    if newest and int(_CHECKPOINT.match(os.path.basename(newest)).group(1)) > step:
        return None  # a later segment was stopped after this end: it resumes
    ends = []
    if 0 < training_args.max_steps < 10**9 and step >= training_args.max_steps:
        ends.append(("--max_steps", f"step {step}"))
    if max_train_time and results.get("train_time_budget_reached") and \
            results.get("train_time_budget", 0) >= max_train_time:
        ends.append(("--max_train_time", f"its time budget at step {step}"))
    if training_args.max_steps <= 0 and not max_train_time and \
            state.get("epoch", 0) >= training_args.num_train_epochs - 1e-6:
        ends.append(("--num_train_epochs", f"epoch {state.get('epoch', 0):g} (step {step})"))
    if not ends:
        return None
    flag, where = ends[0]
    return (f"{out} already finished at {where} (the model is saved there); nothing was changed. Use a new "
            f"--output_dir to train again, or raise {flag} to train on.")


def save_final_model(trainer) -> None:
    """Save the trained model and tokenizer into output_dir so that no reader ever sees half a file.

    Everything is written to a temporary directory first (every process takes part, as
    sharded models are gathered), then each file is moved into place with an atomic rename,
    the weights last.
    """
    import shutil

    output_dir = trainer.args.output_dir
    tmp = os.path.join(output_dir, ".saving-final-model")
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(tmp)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        names = sorted(os.listdir(tmp), key=lambda n: (n.startswith("model") or n.startswith("pytorch_model"), n))
        match_weight_file_modes(tmp)  # before the weights appear under their final name
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
        os.rmdir(tmp)
    trainer.accelerator.wait_for_everyone()
