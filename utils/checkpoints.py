"""Finding the checkpoint a run resumes from."""

from __future__ import annotations

import logging
import os

from transformers.trainer_utils import get_last_checkpoint

from utils.errors import UsageError

logger = logging.getLogger(__name__)


def find_resume_checkpoint(training_args) -> str | None:
    """The checkpoint to resume from: --resume_from_checkpoint, else the newest one in output_dir.

    Rerunning the same command after an interruption therefore continues where it stopped.
    """
    path = training_args.resume_from_checkpoint
    if path and path.lower() != "true":
        if not os.path.isdir(path):
            raise UsageError(f"--resume_from_checkpoint {path} is not a directory")
        return path
    last = None
    if training_args.do_train and os.path.isdir(training_args.output_dir):
        last = get_last_checkpoint(training_args.output_dir)
    if last is None and path:  # "true": resume from the newest checkpoint in output_dir
        raise UsageError(f"--resume_from_checkpoint true: --output_dir {training_args.output_dir} holds no checkpoint")
    if last is not None:
        logger.info("Resuming from %s (found in --output_dir; use another --output_dir to start over)", last)
    return last
