"""The ending of every ``jobs/*.py`` entry point: a user mistake is one line and exit status 2.

:func:`user_errors` wraps a job's Hydra ``main``: a ``ValueError`` (bad config, bad input, a refused
rerun), a missing file or a permission problem prints ``<job>: <reason>`` (its first line) on stderr
and exits with 2, instead of a traceback followed by Hydra's "Error executing job with overrides"
line (which would repeat every override, values included). ``HYDRA_FULL_ERROR=1`` re-raises, for
the traceback. Anything else (a bug, a Ray failure) keeps its traceback.

Credentials are refused here for every job, twice: the raw command-line overrides when the job's
module runs as ``__main__`` (at decoration time, before ``@hydra.main`` parses ``sys.argv`` and could
echo a value in an error or save it to ``.hydra/overrides.yaml``), and the composed config before
the job starts (credentials in a config file). Both name the key, never the value, one line, exit 2.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable, Mapping

from fcas.security import CredentialsInConfigError, refuse_credential_overrides, refuse_credentials

__all__ = ["USER_ERRORS", "user_errors"]

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _refuse(job: str, check: Callable[[], None]) -> None:
    """Run ``check``; a :class:`CredentialsInConfigError` becomes one line and exit 2 (even with HYDRA_FULL_ERROR)."""
    try:
        check()
    except CredentialsInConfigError as err:
        print(f"{job}: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def user_errors(job: str) -> Callable:
    """Decorator for a job's ``main(cfg)`` (put it under ``@hydra.main``)."""

    def wrap(fn: Callable) -> Callable:
        if fn.__module__ == "__main__":   # python jobs/<job>.py ...: before Hydra sees the overrides
            _refuse(job, lambda: refuse_credential_overrides(sys.argv[1:]))

        @functools.wraps(fn)
        def main(*args, **kwargs):
            if args and isinstance(args[0], Mapping):
                _refuse(job, lambda: refuse_credentials(args[0], f"the {job} config"))
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
