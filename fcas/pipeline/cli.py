"""The ending of every ``jobs/*.py`` entry point: a user mistake is one line and exit status 2.

:func:`user_errors` wraps a job's Hydra ``main``: a ``ValueError`` (bad config, bad input, a refused
rerun), a missing file or a permission problem prints ``<job>: <reason>`` (its first line) on stderr
and exits with 2, instead of a traceback followed by Hydra's "Error executing job with overrides"
line (which would repeat every override, values included). ``HYDRA_FULL_ERROR=1`` re-raises, for
the traceback. Anything else (a bug, a Ray failure) keeps its traceback.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable

__all__ = ["USER_ERRORS", "user_errors"]

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def user_errors(job: str) -> Callable:
    """Decorator for a job's ``main(cfg)`` (put it under ``@hydra.main``)."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def main(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except USER_ERRORS as err:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                lines = str(err).strip().splitlines() or [type(err).__name__]
                print(f"{job}: {lines[0]}", file=sys.stderr)
                raise SystemExit(2) from None

        return main

    return wrap
