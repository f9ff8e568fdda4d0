"""The ``fcas <job> key=value ...`` console command (also ``python -m fcas <job>`` and ``python jobs/<job>.py``).

Each job's Hydra entry point is ``fcas/pipeline/commands/<job>.py``: ``main``, ``@hydra.main`` over
``@user_errors("<job>")``, composed from :func:`fcas.bundled.config_dir` (not from a path beside a script), so
the jobs run from an installed wheel and from any directory. :func:`run_job` is the one way in for all of them:
it refuses credential overrides before Hydra parses ``sys.argv`` (Hydra could echo them or save them in
``.hydra/overrides.yaml``), then hands the overrides to the job's ``main``.
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

from fcas.bundled import fcas_home
from fcas.cli import refuse_credential_argv

__all__ = ["JOBS", "main", "run_job"]

JOBS = ("synthesize", "prepare", "plan", "train_vae", "cache_latents", "train_tcdm", "pretrain_cal", "evaluate",
        "export_nnunet", "reproduce")

USAGE = f"""usage: fcas <job> [key=value ...]      (python -m fcas <job> ..., or fcas-<job> ...)
       fcas <job> --help                 (the job's config and Hydra's options)

jobs: {", ".join(JOBS)}
Configs and the bundled checkpoints come with the package; FCAS_HOME=<folder with configs/ and/or
checkpoints/> takes precedence. Example: fcas synthesize preset=tiny n=2 out=/tmp/run
"""


def run_job(job: str, argv: Sequence[str] | None = None) -> None:
    """Run ``job`` with the Hydra overrides ``argv`` (default: this script's own ``sys.argv[1:]``)."""
    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}; jobs: {', '.join(JOBS)}")
    args = list(sys.argv[1:] if argv is None else argv)
    refuse_credential_argv(job, args)   # before Hydra sees them
    try:
        fcas_home()
    except ValueError as err:
        print(f"{job}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    module = importlib.import_module(f"{__name__}.{job}")
    if argv is None:   # python jobs/<job>.py: Hydra parses sys.argv as it is
        module.main()
        return
    saved, sys.argv = sys.argv, [f"fcas {job}", *args]   # Hydra's --help then names `fcas <job>`
    try:
        module.main()
    finally:
        sys.argv = saved


def main(argv: Sequence[str] | None = None) -> None:
    """The ``fcas`` console command: ``fcas <job> [key=value ...]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="", file=sys.stdout if args else sys.stderr)
        raise SystemExit(0 if args else 2)
    job = args[0]
    if job not in JOBS:
        refuse_credential_argv("fcas", args)   # never echo a credential, even as a job name
        print(f"fcas: unknown job {args[0]!r}; jobs: {', '.join(JOBS)}", file=sys.stderr)
        raise SystemExit(2)
    run_job(job, args[1:])
