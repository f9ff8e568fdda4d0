"""Parquet manifests with declared schemas (pyarrow), on any fsspec URI.

Schemas:

* :data:`CASES_SCHEMA` -- one row per prepared case: ``case_id``, ``image_uri``, ``label_uri`` (relative
  to the folder holding the manifest; read with :func:`read_cases`), ``shape`` (list<int32>, I J K),
  ``spacing`` (list<float64>, mm), ``class_voxels`` (map<string, int64>: voxel count per class name),
  ``split`` (train / template / reference / test), ``source`` (where the case came from).
* :data:`REJECTS_SCHEMA` -- one row per input refused by a stage: ``source``, ``reason``, ``stage``.

More schemas (the synthesis manifest, ...) are declared with :func:`make_schema` and added to
:data:`SCHEMAS` by the module that owns them; :func:`write_table` / :func:`read_table` accept a
``pyarrow.Schema`` or a registered name.

Writing validates every row against the schema in Python first, so a wrong type is reported as
``row 3, field 'shape'[1]: expected int32, got 'a' (str)`` instead of an Arrow traceback, and
nothing is written. Files are serialized in memory and written with
:func:`fcas.io.storage.atomic_write_bytes`.

Reading accepts a file, a directory of shards (``*.parquet`` directly inside it, hidden and
``_``-prefixed names skipped) or a glob; shards are read by a thread pool (object stores answer
requests in parallel) and concatenated in file-name order. :func:`read_manifest_dedup` keeps the
last row of each key (a retried sample overwrites its files and appends a new row; readers drop the
earlier one).

At scale (a shard per writer batch is 25,000 files at n = 100,000) :func:`compact` folds a folder's
shards into one ``compact-<generation>.parquet`` and then deletes exactly the shards it read: the
new file is complete before anything is removed (a crash in between leaves duplicate rows, which
readers drop), and shards written meanwhile are not touched. Compacted files sort before
``part-*`` shards and by generation, so "last row wins" still prefers the newest write.

Portable URIs: a manifest may store its files relative to a root folder (a synthesis run stores
``samples/s00000012_image.nii.gz``), so a copied folder (S3 to local, one disk to another) still
reads. :func:`resolve_uris` joins such values onto the root a reader was given; an absolute path or a
URI with a scheme (``s3://``, ``file://``, as older manifests hold) is kept as it is. A prepared
``cases.parquet`` stores its files relative to the folder holding it (``cases/ct01_image.nii.gz``);
:func:`read_cases` is the one reader of such manifests and resolves them against that folder.

The schemas and the row validation are :mod:`fcas.io.manifest_schema`, re-exported here.

Hand-written row validation; Parquet I/O is pyarrow's.
"""
from __future__ import annotations

import io
import logging
import os
import posixpath
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fcas.io import storage
from fcas.io.manifest_schema import CASES_SCHEMA, REJECTS_SCHEMA, SCHEMAS, make_schema, resolve_schema, validate_rows

log = logging.getLogger(__name__)

__all__ = [
    "CASES_SCHEMA",
    "REJECTS_SCHEMA",
    "SCHEMAS",
    "make_schema",
    "validate_rows",
    "write_table",
    "read_table",
    "read_manifest_dedup",
    "map_to_dict",
    "compact",
    "resolve_uris",
    "CASE_URI_COLUMNS",
    "cases_uri",
    "read_cases",
    "resolve_cases",
    "READ_THREADS",
]

READ_THREADS = 16   # concurrent shard reads (S3 GETs overlap; local parsing releases the GIL)
_COMPACT_RE = re.compile(r"^compact-(\d{10})-[0-9a-f]{8}\.parquet$")
_ABSOLUTE_URI = r"^(/|[A-Za-z][A-Za-z0-9+.-]*:)"   # /local/path, s3://..., file://... (kept as they are)
_PARENT_PART = r"(^|/)\.\.(/|$)"

CASE_URI_COLUMNS = ("image_uri", "label_uri")   # relative to the folder holding cases.parquet (absolute: old)


def write_table(
    uri: str | os.PathLike,
    rows: list[Mapping[str, Any]] | pa.Table,
    schema: pa.Schema | str,
    compression: str = "zstd",
) -> None:
    """Validate ``rows`` against ``schema`` and write one Parquet file atomically.

    Args:
        uri: destination file (local path, ``file://`` or ``s3://``), e.g. ``.../part-00003.parquet``.
        rows: list of dicts (one per row), or a ``pyarrow.Table`` that is cast to ``schema``.
        schema: a ``pyarrow.Schema`` or a name registered in :data:`SCHEMAS`.
        compression: Parquet codec.

    Raises:
        ValueError: a row does not fit the schema; nothing is written.
    """
    schema = resolve_schema(schema)
    if isinstance(rows, pa.Table):
        try:
            table = rows.select(schema.names).cast(schema)
        except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as exc:
            raise ValueError(f"table does not fit schema {schema.names}: {exc}") from exc
    else:
        table = validate_rows(list(rows), schema)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression=compression)
    storage.atomic_write_bytes(uri, sink.getvalue())


def _is_glob(uri: str) -> bool:
    return any(c in uri for c in "*?[")


def _shard_uris(uri: str) -> list[str]:
    if _is_glob(uri):
        return storage.glob(uri)
    if storage.isdir(uri):
        out = []
        for child in storage.listdir(uri):
            name = child.rstrip("/").rsplit("/", 1)[-1]
            if name.endswith(".parquet") and not name.startswith((".", "_")):
                out.append(child)
        return sorted(out)
    return [uri]


def read_table(uri: str | os.PathLike, schema: pa.Schema | str | None = None,
               quarantine: str | None = None) -> pa.Table:
    """Read a Parquet file, a directory of shards or a glob into one table.

    Args:
        uri: file, directory (its ``*.parquet``, e.g. ``part-*.parquet``) or glob pattern.
        schema: when given, every shard is conformed to it (columns missing from older shards
            become nulls, columns are cast), and an empty directory / glob gives an empty table;
            otherwise shard schemas are unified (``promote_options="default"``).

    Raises:
        FileNotFoundError: nothing to read (and no ``schema`` given).
        ValueError: a shard is not Parquet or does not fit ``schema`` (message names it).
    """
    uri = os.fspath(uri)
    target = resolve_schema(schema) if schema is not None else None
    if not _is_glob(uri) and not storage.exists(uri):
        if target is not None:
            return target.empty_table()
        raise FileNotFoundError(f"no manifest at {uri}")
    shards = _shard_uris(uri)
    if not shards:
        if target is not None:
            return target.empty_table()
        raise FileNotFoundError(f"no Parquet files at {uri}")
    return _read_shards(shards, target, quarantine)


def _read_shards(shards: list[str], target: pa.Schema | None, quarantine: str | None = None) -> pa.Table:
    """Read and concatenate ``shards`` (file-name order). An I/O error propagates as it is (transient:
    the caller fails or retries); a shard whose bytes are not Parquet is refused (``ValueError``) or,
    with ``quarantine`` (a folder), moved there with a warning and left out, so its samples are redone."""
    bad: list[tuple[str, bytes, str]] = []

    def one(shard: str) -> pa.Table | None:
        data = storage.read_bytes(shard)
        try:
            t = pq.read_table(pa.BufferReader(data))
        except (pa.ArrowInvalid, OSError) as exc:
            if quarantine is None:
                raise ValueError(f"{shard}: not a readable Parquet file: {exc}") from exc
            bad.append((shard, data, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
            return None
        return _conform(t, target, shard) if target is not None else t

    if len(shards) == 1:
        tables = [one(shards[0])]
    else:
        with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(shards))) as pool:
            tables = list(pool.map(one, shards))   # file-name order; the first error is raised
    for shard, data, why in bad:
        name = shard.rstrip("/").rsplit("/", 1)[-1]
        storage.atomic_write_bytes(storage.join(quarantine, name), data)
        storage.remove(shard, missing_ok=True)
        log.warning("%s: not a readable Parquet file (%s); moved to %s, its samples will be redone",
                    shard, why, quarantine)
    tables = [t for t in tables if t is not None]
    if not tables:
        if target is not None:
            return target.empty_table()
        raise ValueError(f"no readable Parquet shard among {len(shards)}")
    if target is not None:
        return pa.concat_tables(tables)
    return pa.concat_tables(tables, promote_options="default")


def _dedup_last(table: pa.Table, key: str) -> pa.Table:
    if key not in table.column_names:
        raise ValueError(f"dedup key {key!r} not in manifest columns {table.column_names}")
    if table.num_rows == 0:
        return table
    idx_name = "__fcas_row__"
    indexed = table.append_column(idx_name, pa.array(np.arange(table.num_rows, dtype=np.int64)))
    last = indexed.group_by(key, use_threads=False).aggregate([(idx_name, "max")])
    keep = np.sort(last[f"{idx_name}_max"].to_numpy())
    return table.take(pa.array(keep))


def compact(folder: str, schema: pa.Schema | str, key: str | None = None, min_shards: int = 32,
            quarantine: str | None = None) -> dict:
    """Fold the shards of ``folder`` into one compacted Parquet file, then delete the shards read.

    Runs when the folder holds at least ``min_shards`` ``part-*`` shards, or more than one compacted
    file. With ``key`` only the last row of each key is kept (:func:`read_manifest_dedup`'s rule);
    without, every row is kept (a rejects list). Call from one process per folder at a time (the
    run's driver); writers may keep adding shards meanwhile.

    Returns ``{"compacted": bool, "shards_read", "rows", "file"}``.
    """
    schema = resolve_schema(schema)
    if not storage.exists(folder):
        return {"compacted": False, "shards_read": 0, "rows": 0, "file": None}
    shards = _shard_uris(folder)
    names = [u.rstrip("/").rsplit("/", 1)[-1] for u in shards]
    gens = [int(m.group(1)) for m in map(_COMPACT_RE.match, names) if m]
    parts = len(shards) - len(gens)
    if parts < min_shards and len(gens) <= 1:
        return {"compacted": False, "shards_read": 0, "rows": 0, "file": None}
    table = _read_shards(shards, schema, quarantine)
    if key is not None:
        table = _dedup_last(table, key)
    gen = max(gens, default=0) + 1
    uri = storage.join(folder, f"compact-{gen:010d}-{uuid.uuid4().hex[:8]}.parquet")
    write_table(uri, table, schema)
    storage.remove_many(shards)   # the new file is durable: the shards it holds can go
    return {"compacted": True, "shards_read": len(shards), "rows": table.num_rows, "file": uri}


def _conform(table: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    arrays = []
    for field in schema:
        if field.name in table.column_names:
            col = table[field.name]
            try:
                arrays.append(col.cast(field.type) if col.type != field.type else col)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                raise ValueError(f"{where}: column {field.name!r} {col.type} does not cast to "
                                 f"{field.type}: {exc}") from exc
        elif field.nullable:
            arrays.append(pa.nulls(table.num_rows, type=field.type))
        else:
            raise ValueError(f"{where}: required column {field.name!r} is missing")
    return pa.Table.from_arrays(arrays, schema=schema)


def read_manifest_dedup(
    uri: str | os.PathLike, key: str = "sample_id", schema: pa.Schema | str | None = None,
    quarantine: str | None = None,
) -> pa.Table:
    """:func:`read_table`, keeping only the last row of each ``key`` value.

    "Last" is in shard file-name order, then row order; kept rows stay in their original order.
    """
    return _dedup_last(read_table(uri, schema=schema, quarantine=quarantine), key)


def resolve_uris(table: pa.Table, root: str | os.PathLike, columns: Iterable[str]) -> pa.Table:
    """``table`` with every relative value of ``columns`` joined onto ``root`` (made absolute).

    A value that is an absolute path or carries a scheme (``s3://``, ``file://``) is kept, so old
    manifests holding absolute URIs read as before; nulls stay null. Vectorized (pyarrow compute):
    a few tens of milliseconds per column at 100,000 rows.

    Raises:
        ValueError: a relative value with a ``..`` part (it would lead out of ``root``).
    """
    root = storage.absolute(os.fspath(root))
    prefix = root.rstrip("/") + "/"
    for name in columns:
        col = table[name]
        keep = pc.match_substring_regex(col, _ABSOLUTE_URI)
        dots = pc.filter(col, pc.and_(pc.invert(keep), pc.match_substring(col, "..")))   # cheap pre-filter
        bad = pc.filter(dots, pc.match_substring_regex(dots, _PARENT_PART))
        if len(bad):
            raise ValueError(f"{name} {bad[0].as_py()!r} leads out of the root {root}")
        resolved = pc.if_else(keep, col, pc.binary_join_element_wise(prefix, col, ""))
        i = table.schema.get_field_index(name)
        table = table.set_column(i, table.schema.field(i), resolved)
    return table


def cases_uri(uri: str | os.PathLike) -> str:
    """A cases manifest's file: ``uri`` itself, or the ``cases.parquet`` inside the folder ``uri`` when it has one."""
    uri = os.fspath(uri)
    if not uri.endswith(".parquet") and storage.exists(storage.join(uri, "cases.parquet")):
        return storage.join(uri, "cases.parquet")
    return uri


def resolve_cases(table: pa.Table, uri: str | os.PathLike) -> pa.Table:
    """A cases table read from ``uri`` with its :data:`CASE_URI_COLUMNS` (those present) resolved against the
    folder holding ``uri`` (for a folder of shards: that folder), see :func:`resolve_uris`."""
    uri = storage.absolute(os.fspath(uri))
    root = uri if not uri.endswith(".parquet") and storage.isdir(uri) else posixpath.dirname(uri)
    return resolve_uris(table, root, [c for c in CASE_URI_COLUMNS if c in table.column_names])


def read_cases(uri: str | os.PathLike, resolve: bool = True, schema: pa.Schema | str | None = CASES_SCHEMA) -> pa.Table:
    """A prepared cases manifest (``cases.parquet`` or the folder holding it) with absolute file URIs.

    ``resolve``: relative ``image_uri`` / ``label_uri`` joined onto the manifest's folder, so a library copied
    elsewhere reads from its new place (absolute ones of older manifests kept); False gives them as stored.
    ``schema``: as :func:`read_table` (None: the file's own columns).
    """
    uri = cases_uri(uri)
    table = read_table(uri, schema=schema)
    return resolve_cases(table, uri) if resolve else table


def map_to_dict(value) -> dict | None:
    """A map cell as read back (list of ``(key, value)`` pairs) -> dict; None stays None."""
    if value is None:
        return None
    return dict(value)
