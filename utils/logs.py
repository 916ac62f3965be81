"""Logging: readable on the main process, quiet on the others."""

from __future__ import annotations

import logging
import sys

import datasets
import transformers

# One format for every script of the project (run_mlm, prepare_dataset, downstream).
FORMAT, DATE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"


def setup_tool_logging() -> None:
    """The log format of run_mlm, at INFO, for the tools that have no TrainingArguments of their own."""
    logging.basicConfig(format=FORMAT, datefmt=DATE_FORMAT, level=logging.INFO,
                        handlers=[logging.StreamHandler(sys.stdout)])


def setup_logging(training_args) -> None:
    """Log INFO from this project on the main process (WARNING elsewhere) and one line per process."""
    logging.basicConfig(format=FORMAT, datefmt=DATE_FORMAT, handlers=[logging.StreamHandler(sys.stdout)])
    # --log_level / --log_level_replica set the libraries' verbosity; ours is INFO on the main
    # process of each node (or of the run, without --log_on_each_node) and WARNING elsewhere.
    library_level = training_args.get_process_log_level()
    transformers.utils.logging.set_verbosity(library_level)
    datasets.utils.logging.set_verbosity(library_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    from utils.train.distributed import processes

    who = processes(training_args)
    main = who.local_rank == 0 if training_args.log_on_each_node else who.rank == 0
    own_level = logging.INFO if main else logging.WARNING
    for name in ("run_mlm", "utils"):
        logging.getLogger(name).setLevel(min(own_level, library_level))
    # One-line summaries of each process (rank, checksums) show on every rank.
    logging.getLogger("run_mlm.process").setLevel(logging.INFO)


def log_process(training_args) -> None:
    """One line per process: its rank, device and mixed precision (after the precision is chosen)."""
    from utils.train.distributed import processes

    who = processes(training_args)
    # Set by --bf16/--fp16 or by the accelerate config's mixed_precision; on XLA, bf16 is our own autocast.
    precision = getattr(training_args, "mixed_precision", None) or ("bf16" if training_args.bf16 else "no")
    if getattr(training_args, "xla_autocast_bf16", False):
        precision = "bf16 (autocast, fp32 weights)"
    # INFO on every process (run_mlm.process, see setup_logging): a summary, not a warning.
    logging.getLogger("run_mlm.process").info("Process rank %d of %d, device %s, mixed precision %s",
                                              who.rank, who.world, training_args.device, precision)
