"""The ending of every job's Hydra ``main`` (fcas/pipeline/commands/<job>.py): a user mistake is one line, exit 2.

:func:`user_errors` wraps a job's Hydra ``main``: a ``ValueError`` (bad config, bad input, a refused
rerun), a missing file or a permission problem prints ``<job>: <reason>`` (its first line) on stderr
and exits with 2, instead of a traceback followed by Hydra's "Error executing job with overrides"
line (which would repeat every override, values included). ``HYDRA_FULL_ERROR=1`` re-raises, for
the traceback. A storage error that outlived its retries (:class:`fcas.io.storage.StorageError`:
disk full, I/O errors, lost connections) is one line too, with exit status 1. Anything else (a bug,
a Ray failure) keeps its traceback.

Credentials are refused here for every job, twice: the raw command-line overrides before ``@hydra.main``
parses ``sys.argv`` (it could echo a value in an error or save it to ``.hydra/overrides.yaml``), by
:func:`refuse_credential_argv` (:func:`fcas.pipeline.commands.run_job`, the way into every job, calls it; so
does ``user_errors`` at decoration time when the job's module runs as ``__main__``), and the composed config
before the job starts (credentials in a config file). Both name the key, never the value, one line, exit 2.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable, Mapping, Sequence

from fcas.io.storage import StorageError
from fcas.security import CredentialsInConfigError, refuse_credential_overrides, refuse_credentials

__all__ = ["USER_ERRORS", "refuse_credential_argv", "user_errors"]

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _refuse(job: str, check: Callable[[], None]) -> None:
    """Run ``check``; a :class:`CredentialsInConfigError` becomes one line and exit 2 (even with HYDRA_FULL_ERROR)."""
    try:
        check()
    except CredentialsInConfigError as err:
        print(f"{job}: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def refuse_credential_argv(job: str, argv: Sequence[str]) -> None:
    """Exit 2 with one line naming (never showing) any credential among the overrides ``argv``."""
    _refuse(job, lambda: refuse_credential_overrides(list(argv)))


def user_errors(job: str) -> Callable:
    """Decorator for a job's ``main(cfg)`` (put it under ``@hydra.main``)."""

    def wrap(fn: Callable) -> Callable:
        if fn.__module__ == "__main__":   # a job module run as a script: before Hydra sees the overrides
            refuse_credential_argv(job, sys.argv[1:])

        @functools.wraps(fn)
        def main(*args, **kwargs):
            if args and isinstance(args[0], Mapping):
                _refuse(job, lambda: refuse_credentials(args[0], f"the {job} config"))
            try:
                return fn(*args, **kwargs)
            except (StorageError, *USER_ERRORS) as err:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                lines = str(err).strip().splitlines() or [type(err).__name__]
                print(f"{job}: {lines[0]}", file=sys.stderr)
                raise SystemExit(1 if isinstance(err, StorageError) else 2) from None

        return main

    return wrap
