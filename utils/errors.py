"""Errors a run reports as one line with a documented exit status, instead of a traceback.

Exit statuses of `run_mlm.py` and the tools in utils/:
    0    finished
    2    usage error: bad input or contradictory settings (`error: ...`), nothing written
    3    training diverged: nan/inf gradients with `--nonfinite_loss stop` (`diverged: ...`)
    130  stopped by SIGINT (Ctrl-C), 143 by SIGTERM, after saving a checkpoint (`stopped: ...`)
Anything else (1 with a traceback) is a bug or a failure outside the run's control.
"""

from __future__ import annotations

import functools
import os
import sys


class RunError(Exception):
    """A run ended for a reason the user can act on: one line on stderr, and `exit_code`."""

    exit_code = 1
    prefix = "error"


class UsageError(RunError, ValueError):
    """Bad input or contradictory settings: the message names the flag or file and the fix."""

    exit_code = 2


def one_line(error: Exception, limit: int = 300) -> str:
    """A library's (often multi-line) error message squeezed into one line of at most `limit` characters."""
    return " ".join(str(error).split())[:limit]


# How long a process that is done with collectives lets gloo's worker threads run first.
SETTLE_SECONDS = 0.1


def let_collectives_settle() -> None:
    """Sleep briefly, the GIL released, when this process is in a process group.

    A gloo worker thread frees a finished collective's tensors after the caller's wait()
    has returned, holding the group's work lock and waiting for the GIL to drop their
    Python objects. If in that moment the main thread frees the last reference to the
    group from DDP's Reducer, whose destructor keeps the GIL and waits for that lock, both
    wait forever: a finished 2-process run hung at exit in the test suite, and DDP
    teardowns right after a gather hung within ~15 tries (tests/test_distributed.py). The
    tensors are dropped within microseconds of the wait, so after this pause, with no
    collective issued after it, the group dies cleanly.
    """
    import time

    dist = sys.modules.get("torch.distributed")  # never import torch only for this
    if dist is not None and dist.is_available() and dist.is_initialized():
        time.sleep(SETTLE_SECONDS)


def exit_on_usage_error(fn):
    """Run `fn`; turn a RunError into `<prefix>: <message>` on stderr and its exit status.

    Other exceptions keep their traceback. Set RUN_MLM_DEBUG=1 to see the traceback of a
    RunError too.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RunError as e:
            if os.environ.get("RUN_MLM_DEBUG"):
                raise
            print(f"{e.prefix}: {e}", file=sys.stderr)
            sys.exit(e.exit_code)
        finally:
            # A run that failed (or never left its process group) frees the group's last
            # holder, DDP's Reducer, after this: first let gloo finish freeing tensors.
            let_collectives_settle()

    return wrapper
