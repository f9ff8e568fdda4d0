"""One driver at a time per run: the lease ``out/lease.json``.

A resubmitted ``ray job submit`` or a scheduler's retry must not start a second driver on the same
``out`` (every sample made twice, manifests from two drivers interleaved, compaction deleting the
other's shards). The driver takes the lease before it touches anything in ``out`` and keeps it
alive with a heartbeat thread; a second driver finds it and is refused with one line naming the
holder. A lease whose heartbeat is older than ``ttl`` seconds, or whose holder is a dead process on
this host, is stale and is taken over.

Taking it is atomic: locally the record is written to a temporary file and ``os.link``-ed to its
name (fails if the name exists, so a reader never sees half a record); on S3 it is a conditional
put (``If-None-Match: *``, s3fs ``mode="create"``), read back to confirm for servers that ignore
the condition. Hand-written: no library offers a lease on an fsspec path.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from fcas.io import storage
from fcas.security import safe_child

__all__ = ["LEASE_FILE", "LeaseHeld", "Lease", "acquire_lease", "read_lease"]

log = logging.getLogger(__name__)

LEASE_FILE = "lease.json"
DEFAULT_TTL = 120.0   # seconds without a heartbeat after which another driver may take the run over


class LeaseHeld(ValueError):
    """Another live driver holds the run's lease (a user-facing refusal: one line, exit 2)."""


def read_lease(out: str) -> dict | None:
    """The lease record of ``out`` (None when there is none; ``{}`` when it cannot be parsed)."""
    uri = safe_child(out, LEASE_FILE)
    try:
        raw = storage.read_bytes(uri)
    except FileNotFoundError:
        return None
    try:
        rec = json.loads(raw)
    except ValueError:
        return {}
    return rec if isinstance(rec, dict) else {}


def _create_exclusive(uri: str, data: bytes) -> bool:
    """Write ``data`` to ``uri`` only if nothing is there; True when this call created it."""
    fs, path = storage.get_fs(uri)
    if storage.is_local(uri):
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    try:
        fs.pipe_file(path, data, mode="create")
    except OSError as err:   # FileExistsError included
        if isinstance(err, FileExistsError) or "PreconditionFailed" in str(err) or "412" in str(err):
            return False
        raise
    fs.invalidate_cache(path)
    return json.loads(fs.cat_file(path)).get("token") == json.loads(data)["token"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_reason(rec: dict, ttl: float, now: float) -> str | None:
    """Why the lease ``rec`` may be taken over (None while its holder is alive)."""
    beat = rec.get("heartbeat_at")
    if not isinstance(beat, (int, float)):
        return "unreadable lease record"
    if now - beat > ttl:
        return f"no heartbeat for {now - beat:.0f} s (> ttl {ttl:.0f} s)"
    if rec.get("host") == socket.gethostname() and isinstance(rec.get("pid"), int) and not _pid_alive(rec["pid"]):
        return f"its process {rec['pid']} on this host has ended"
    return None


@dataclass
class Lease:
    """A held lease; :meth:`release` (or the context manager) gives it back."""

    out: str
    token: str
    ttl: float
    record: dict
    lost: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def uri(self) -> str:
        return safe_child(self.out, LEASE_FILE)

    def owned(self) -> bool:
        rec = read_lease(self.out)
        return bool(rec) and rec.get("token") == self.token

    def beat(self) -> None:
        """Refresh the heartbeat (if the lease is still ours; otherwise mark it lost)."""
        if not self.owned():
            if not self.lost.is_set():
                log.error("lease of %s was taken over by another driver; this driver's writes may now "
                          "collide with it", self.out)
            self.lost.set()
            return
        self.record["heartbeat_at"] = time.time()
        storage.atomic_write_bytes(self.uri, json.dumps(self.record).encode())

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.beat()
            except OSError as err:   # a transient storage error: the next beat retries
                log.warning("lease heartbeat of %s failed: %s", self.out, err)

    def start(self, interval: float | None = None) -> "Lease":
        interval = self.ttl / 4 if interval is None else interval
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True, name="fcas-lease")
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.owned():
            storage.remove(self.uri, missing_ok=True)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire_lease(out: str, ttl: float = DEFAULT_TTL, heartbeat: bool = True) -> Lease:
    """Take the lease of run ``out`` (creating ``out`` if needed), or raise :class:`LeaseHeld`."""
    if ttl <= 0:
        raise ValueError(f"lease ttl must be > 0 seconds, got {ttl}")
    try:
        storage.makedirs(out)
    except (FileExistsError, NotADirectoryError) as err:
        raise NotADirectoryError(f"{out}: exists and is not a folder (out must be a run folder)") from err
    uri = safe_child(out, LEASE_FILE)
    token = uuid.uuid4().hex
    now = time.time()
    rec = {"token": token, "host": socket.gethostname(), "pid": os.getpid(), "started_at": now,
           "heartbeat_at": now, "ttl": ttl}
    for _ in range(3):
        if _create_exclusive(uri, json.dumps(rec).encode()):
            lease = Lease(out=out, token=token, ttl=ttl, record=rec)
            return lease.start() if heartbeat else lease
        held = read_lease(out)
        if held is None:   # released between our try and the read: try again
            continue
        why = _stale_reason(held, ttl, time.time())
        if why is None:
            age = time.time() - held["heartbeat_at"]
            raise LeaseHeld(f"{uri}: another driver is running this run (host {held.get('host')}, pid "
                            f"{held.get('pid')}, heartbeat {age:.0f} s ago); wait for it to end, or use another "
                            f"out (a dead driver's lease is taken over after {ttl:.0f} s)")
        log.warning("taking over the lease of %s: %s", out, why)
        _take_aside(uri, held)
    raise LeaseHeld(f"{uri}: the lease changed hands while this driver tried to take it; another driver "
                    "is starting on this run")


def _take_aside(uri: str, held: dict) -> None:
    """Remove a stale lease (locally by an atomic rename, so two drivers cannot both remove it)."""
    out = uri.rsplit("/", 1)[0]
    current = read_lease(out)
    if not current or current.get("token") != held.get("token"):
        return   # someone else took it over meanwhile: the next create attempt finds theirs
    if storage.is_local(uri):
        _, path = storage.get_fs(uri)
        try:
            os.rename(path, f"{path}.stale-{uuid.uuid4().hex[:8]}")
        except FileNotFoundError:
            return
        for name in os.listdir(os.path.dirname(path)):
            if name.startswith(f"{LEASE_FILE}.stale-"):
                os.unlink(os.path.join(os.path.dirname(path), name))
        return
    storage.remove(uri, missing_ok=True)
