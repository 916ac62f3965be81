"""Errors a user can cause, reported as one line instead of a traceback."""

from __future__ import annotations

import functools
import os
import sys


class UsageError(ValueError):
    """Bad input or contradictory settings: the message names the flag or file and the fix."""


def one_line(error: Exception, limit: int = 300) -> str:
    """A library's (often multi-line) error message squeezed into one line of at most `limit` characters."""
    return " ".join(str(error).split())[:limit]


def exit_on_usage_error(fn):
    """Run `fn`; turn a UsageError into `error: <message>` on stderr and exit status 2.

    Set RUN_MLM_DEBUG=1 to see the full traceback instead.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UsageError as e:
            if os.environ.get("RUN_MLM_DEBUG"):
                raise
            print(f"{getattr(e, 'prefix', 'error')}: {e}", file=sys.stderr)
            sys.exit(getattr(e, "exit_code", 2))

    return wrapper
