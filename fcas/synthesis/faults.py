"""Fault injection for the reliability tests: off unless a job is given a :class:`FaultPlan`.

Failures are injected where real ones happen (a writer dying after some of a sample's files are
written; a sampler raising on one sample every time). "Once" is tracked with marker files created
exclusively in ``marker_dir`` (a local folder every worker of a one-machine cluster sees), so a
retried task, in whichever worker process it runs, sees that the first attempt already failed.
Hand-written: no library injects faults into Ray Data stages.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass

__all__ = ["FaultPlan", "InjectedFault"]


class InjectedFault(RuntimeError):
    """Raised by an injected failure (so tests can tell it from a real one)."""


@dataclass(frozen=True)
class FaultPlan:
    marker_dir: str = ""
    writer_fail_once: bool = False                # each sample's first write raises after its image file
    sampler_error_ids: tuple[int, ...] = ()       # these sample ids raise in the sampler on every try
    disk_full_ids: tuple[int, ...] = ()           # prepare: writing these phantom cases raises ENOSPC every time
    io_error_once_ids: tuple[int, ...] = ()       # prepare: these phantom cases' first write raises EIO

    def __post_init__(self) -> None:
        if (self.writer_fail_once or self.sampler_error_ids or self.io_error_once_ids) and not self.marker_dir:
            raise ValueError("FaultPlan needs marker_dir (a local folder) to record injected failures")

    def first_time(self, key: str) -> bool:
        """True exactly once per ``key`` across processes (exclusive creation of a marker file)."""
        os.makedirs(self.marker_dir, exist_ok=True)
        try:
            fd = os.open(os.path.join(self.marker_dir, key), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    def writer_should_fail(self, sample_id: int) -> bool:
        return self.writer_fail_once and self.first_time(f"writer-{int(sample_id)}")

    def sampler_should_fail(self, sample_id: int) -> bool:
        return int(sample_id) in self.sampler_error_ids

    def storage_error(self, case_seed: int, uri: str) -> OSError | None:
        """The storage error injected into the write of prepared case ``case_seed`` (None: none)."""
        if int(case_seed) in self.disk_full_ids:
            return OSError(errno.ENOSPC, f"No space left on device (writing {uri})")
        if int(case_seed) in self.io_error_once_ids and self.first_time(f"io-{int(case_seed)}"):
            return OSError(errno.EIO, f"Input/output error (writing {uri})")
        return None
