"""Storage helpers over fsspec: one API for local paths, ``file://`` and ``s3://`` URIs.

Every function takes a URI (or a plain local path) and returns URIs in the same form as given,
so ``join("s3://b/run", "x.nii.gz")`` gives ``"s3://b/run/x.nii.gz"`` and ``glob("out/*.nii")``
gives ``"out/a.nii"``.

S3 goes through s3fs. Endpoint and credentials come from the environment only, never from
configs: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (for MinIO, moto, Ceph, ...),
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` and
``AWS_DEFAULT_REGION`` / ``AWS_REGION``; without them botocore's usual chain (profiles,
instance roles) applies. The endpoint is passed to s3fs explicitly because s3fs does not read
``AWS_ENDPOINT_URL`` itself. s3fs listing caches are switched off (``use_listings_cache=False``):
many processes write the same prefixes, and a cached listing would hide their files.

Buckets are never created: s3fs's ``makedirs`` would create a bucket for a mistyped name (or,
with a region set, fail with a misleading "location-constraint is not valid"). On S3,
:func:`makedirs` only checks that the bucket exists, and a write into a missing bucket raises
:class:`BucketNotFoundError` (a ``FileNotFoundError``, so a job ends with one line and status 2).

Writes are atomic: :func:`atomic_write_bytes` writes a temporary file in the destination
directory and ``os.replace``-s it locally; on object stores a single PUT (or a multipart
upload, completed in one call) never exposes a partial object.

Thin glue over fsspec, hand-written here.
"""
from __future__ import annotations

import errno
import os
import posixpath
import re
import tempfile
import time
from typing import Any, Callable

import fsspec
from fsspec.core import split_protocol

__all__ = [
    "BucketNotFoundError",
    "get_fs",
    "s3_storage_options",
    "is_local",
    "absolute",
    "join",
    "exists",
    "isdir",
    "makedirs",
    "read_bytes",
    "atomic_write_bytes",
    "listdir",
    "glob",
    "remove",
    "remove_many",
    "open_file",
]

_LOCAL_PROTOCOLS = ("file", "local")
_S3_PROTOCOLS = ("s3", "s3a")


class BucketNotFoundError(FileNotFoundError):
    """A makedirs or write under ``s3://<bucket>/`` whose bucket does not exist (FCaS never creates buckets)."""


def _require_bucket(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """:class:`BucketNotFoundError` when the bucket of the S3 ``path`` (``bucket/key``) answers HEAD with 404.

    Any other answer (403 for a bucket this identity may not HEAD, a redirect) passes: the write
    itself then reports what is wrong.
    """
    bucket = path.split("/", 1)[0]
    if not bucket:
        raise ValueError(f"s3 path {path!r} names no bucket")
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        raise BucketNotFoundError(
            f"s3://{bucket}: bucket does not exist (FCaS never creates buckets; create it first)") from None
    except OSError:
        pass


class StorageError(OSError):
    """A storage operation that kept failing with a transient error (disk full, I/O error, connection
    lost, throttled) after :func:`retry_io`'s tries: the job fails with one line naming the file."""


_TRANSIENT_ERRNOS = {errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT,
                     errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE, errno.ENETUNREACH,
                     errno.EHOSTUNREACH, errno.ENETDOWN}
_TRANSIENT_WORDS = ("SlowDown", "Throttl", "RequestTimeout", "ServiceUnavailable", "InternalError",
                    "Connection reset", "Connection aborted", "ConnectTimeout", "ReadTimeout")


def is_transient(err: BaseException) -> bool:
    """True for errors of the storage rather than of the data: disk full, I/O errors, lost or refused
    connections, timeouts, object-store throttling (5xx / SlowDown). A missing file, a permission problem
    or a corrupt file are not (they do not go away by trying again)."""
    if isinstance(err, StorageError):
        return False   # already retried
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
        return True
    text = f"{type(err).__name__}: {err}"
    return any(w in text for w in _TRANSIENT_WORDS)


def retry_io(fn: Callable[[], Any], what: str, tries: int = 4, base_delay: float = 0.5) -> Any:
    """``fn()``, retried with exponential backoff (``base_delay`` s, doubling) while it raises a
    transient error (:func:`is_transient`); after ``tries`` it raises :class:`StorageError` naming
    ``what`` and the last error. Any other error propagates at once."""
    for attempt in range(tries):
        try:
            return fn()
        except Exception as err:   # noqa: BLE001 - classified right here
            if not is_transient(err):
                raise
            if attempt + 1 == tries:
                raise StorageError(f"{what}: storage error after {tries} tries: "
                                   f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
            time.sleep(base_delay * 2 ** attempt)
    raise AssertionError("unreachable")


def _protocol(uri: str) -> str | None:
    protocol, _ = split_protocol(str(uri))
    return protocol


def is_local(uri: str | os.PathLike) -> bool:
    """True for a plain path or a ``file://`` URI."""
    protocol = _protocol(os.fspath(uri))
    return protocol is None or protocol in _LOCAL_PROTOCOLS


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def absolute(uri: str | os.PathLike | None) -> str | None:
    """A relative local path made absolute against the current directory; URIs (``s3://``,
    ``file://``) and sources such as ``phantom:N`` / ``maisi:<file>`` unchanged.

    Ray Train workers run in their own working directory, so jobs resolve paths on the driver.
    """
    if uri is None:
        return None
    uri = os.fspath(uri)
    if _SCHEME.match(uri) or os.path.isabs(uri):
        return uri
    return os.path.abspath(uri)


def s3_storage_options() -> dict[str, Any]:
    """s3fs keyword arguments read from the environment (never from configs).

    Returns a dict for ``s3fs.S3FileSystem``: ``endpoint_url`` from ``AWS_ENDPOINT_URL_S3`` or
    ``AWS_ENDPOINT_URL``, ``key`` / ``secret`` / ``token`` from the ``AWS_*`` credential
    variables and ``client_kwargs.region_name`` from ``AWS_REGION`` / ``AWS_DEFAULT_REGION``;
    unset variables are left to botocore's default chain.
    """
    env = os.environ
    opts: dict[str, Any] = {"use_listings_cache": False}
    client_kwargs: dict[str, Any] = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
        client_kwargs["endpoint_url"] = endpoint
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        client_kwargs["region_name"] = region
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        opts["key"] = env["AWS_ACCESS_KEY_ID"]
        opts["secret"] = env["AWS_SECRET_ACCESS_KEY"]
        if env.get("AWS_SESSION_TOKEN"):
            opts["token"] = env["AWS_SESSION_TOKEN"]
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    return opts


def get_fs(uri: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and protocol-less path for ``uri``.

    Args:
        uri: a local path, ``file://`` URI, ``s3://bucket/key`` or any fsspec URI.

    Returns:
        ``(fs, path)``: for local input ``path`` is absolute; for S3 it is ``"bucket/key"``.
        fsspec caches instances by their options, so a changed endpoint or credential in the
        environment yields a new S3 filesystem.
    """
    uri = os.fspath(uri)
    if not uri:
        raise ValueError("empty URI")
    protocol = _protocol(uri)
    if protocol is None or protocol in _LOCAL_PROTOCOLS:
        fs = fsspec.filesystem("file")
    elif protocol in _S3_PROTOCOLS:
        fs = fsspec.filesystem("s3", **s3_storage_options())
    else:
        fs = fsspec.filesystem(protocol)
    return fs, fs._strip_protocol(uri)


def _to_uri(path: str, like: str) -> str:
    """Turn a protocol-less ``path`` from fsspec into the form of ``like``."""
    protocol = _protocol(like)
    if protocol is None:
        # plain local path: relative input stays relative to the current directory
        return path if os.path.isabs(like) else os.path.relpath(path)
    if protocol in _LOCAL_PROTOCOLS:
        return f"{protocol}://{path}"
    return f"{protocol}://{path.lstrip('/')}"


def join(uri: str | os.PathLike, *parts: str) -> str:
    """Join path components onto a URI or local path (``/`` for URIs, ``os.path`` locally).

    Parts must be relative: an absolute part or one with a protocol raises ``ValueError``
    instead of silently replacing the base as ``os.path.join`` would.
    """
    uri = os.fspath(uri)
    for p in parts:
        p = os.fspath(p)
        if p.startswith("/") or _protocol(p) is not None:
            raise ValueError(f"join: part {p!r} must be a relative path (base {uri!r})")
    if _protocol(uri) is None:
        return os.path.join(uri, *parts)
    clean = [os.fspath(p).strip("/") for p in parts if os.fspath(p).strip("/")]
    if not clean:
        return uri
    return posixpath.join(uri.rstrip("/") if not uri.endswith("://") else uri, *clean)


def exists(uri: str | os.PathLike) -> bool:
    """True when a file or directory (prefix on S3) exists at ``uri``."""
    fs, path = get_fs(uri)
    return fs.exists(path)


def isdir(uri: str | os.PathLike) -> bool:
    """True when ``uri`` is a directory (a non-empty prefix or bucket on S3)."""
    fs, path = get_fs(uri)
    return fs.isdir(path)


def makedirs(uri: str | os.PathLike) -> None:
    """Create a directory and its parents; no-op when it exists.

    S3 has no directories: only the bucket is checked (:class:`BucketNotFoundError` when it is
    missing), and never created, unlike s3fs's own ``makedirs``.
    """
    fs, path = get_fs(uri)
    if _protocol(os.fspath(uri)) in _S3_PROTOCOLS:
        _require_bucket(fs, path)
        return
    fs.makedirs(path, exist_ok=True)


def read_bytes(uri: str | os.PathLike) -> bytes:
    """Whole content of the file at ``uri``; ``FileNotFoundError`` naming it when missing."""
    fs, path = get_fs(uri)
    try:
        return fs.cat_file(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no such file: {os.fspath(uri)}") from exc
    except IsADirectoryError as exc:
        raise IsADirectoryError(f"is a directory, not a file: {os.fspath(uri)}") from exc


def _read_umask() -> int:
    mask = os.umask(0o022)   # the only way to read it is to set it: once, at import, not per write
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write_bytes(uri: str | os.PathLike, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to ``uri`` so that readers see either the old file or the whole new one.

    Local: the parent directory is created, the bytes go to a hidden temporary file in the same
    directory (``.<name>.<random>.tmp``), are flushed and fsync-ed, then ``os.replace``-d onto the
    final name; on any error the temporary file is removed and no file appears under the final
    name (an existing one is left untouched). Object stores: one ``pipe_file`` call, a single PUT
    (multipart completed in one request above 100 MiB), which S3 makes visible atomically; into a
    missing S3 bucket it raises :class:`BucketNotFoundError` (checked only after a failed PUT).
    """
    uri = os.fspath(uri)
    fs, path = get_fs(uri)
    if is_local(uri):
        parent = os.path.dirname(path) or "."
        os.makedirs(parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)   # mkstemp makes 0600; give the mode a plain open() would
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            if isinstance(err, OSError) and err.errno is not None and type(err) is OSError:
                raise OSError(err.errno, f"{err.strerror} (writing {uri})") from err   # name the file, not the temp
            raise
        return
    try:
        fs.pipe_file(path, bytes(data))
    except FileNotFoundError:   # a PUT answers 404 only for a missing bucket: say so
        if _protocol(uri) in _S3_PROTOCOLS:
            _require_bucket(fs, path)
        raise
    fs.invalidate_cache(path)


def listdir(uri: str | os.PathLike) -> list[str]:
    """Sorted URIs of the direct children of directory ``uri``, in the form of ``uri``."""
    uri = os.fspath(uri)
    fs, path = get_fs(uri)
    fs.invalidate_cache(path)
    entries = fs.ls(path, detail=False)
    # object stores may list the prefix itself; drop it
    own = path.rstrip("/")
    return sorted(_to_uri(p, uri) for p in entries if p.rstrip("/") != own)


def glob(pattern: str | os.PathLike) -> list[str]:
    """Sorted URIs matching a glob ``pattern`` (``*``, ``?``, ``[...]``, ``**``), in its form."""
    pattern = os.fspath(pattern)
    fs, path = get_fs(pattern)
    fs.invalidate_cache()
    return sorted(_to_uri(p, pattern) for p in fs.glob(path))


def remove(uri: str | os.PathLike, recursive: bool = False, missing_ok: bool = False) -> None:
    """Delete the file (or, with ``recursive=True``, the directory tree) at ``uri``."""
    fs, path = get_fs(uri)
    try:
        fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        if not missing_ok:
            raise FileNotFoundError(f"no such file: {os.fspath(uri)}") from None
    finally:
        fs.invalidate_cache(path)


def remove_many(uris: list[str]) -> None:
    """Delete several files of one filesystem in one call (batched DELETEs on S3); missing ones are fine."""
    if not uris:
        return
    fs, first = get_fs(uris[0])
    paths = [first] + [get_fs(u)[1] for u in uris[1:]]
    try:
        fs.rm(paths)
    except FileNotFoundError:
        for p in paths:
            try:
                fs.rm(p)
            except FileNotFoundError:
                pass
    finally:
        fs.invalidate_cache(os.path.dirname(first.rstrip("/")) or first)


def open_file(uri: str | os.PathLike, mode: str = "rb", **kwargs: Any):
    """``fs.open`` on ``uri``: a file object for streaming reads (e.g. headers only).

    Writes through this bypass the atomic path; prefer :func:`atomic_write_bytes`. Opening an S3
    object for writing checks its bucket first (:class:`BucketNotFoundError`).
    """
    fs, path = get_fs(uri)
    if _protocol(os.fspath(uri)) in _S3_PROTOCOLS and any(c in mode for c in "wax+"):
        _require_bucket(fs, path)
    return fs.open(path, mode, **kwargs)
