"""Manifest schemas and row validation: the declared Parquet schemas and the check every write runs.

:func:`make_schema` stamps a schema with its ``fcas.schema`` name/version; :data:`SCHEMAS` is the
registry other modules add theirs to; :func:`validate_rows` checks rows in Python before Arrow sees
them, so a bad value is reported by row and field and nothing is written. The files themselves
(write, read, compact, resolve) are :mod:`fcas.io.manifest`, which re-exports all of this.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa

_SCHEMA_NAME_KEY = b"fcas.schema"


def make_schema(name: str, fields: Iterable[pa.Field], version: int = 1) -> pa.Schema:
    """A ``pyarrow.Schema`` stamped with ``fcas.schema = "<name>/v<version>"`` metadata."""
    return pa.schema(list(fields), metadata={_SCHEMA_NAME_KEY: f"{name}/v{version}".encode()})


CASES_SCHEMA = make_schema(
    "cases",
    [
        pa.field("case_id", pa.string(), nullable=False),
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("label_uri", pa.string(), nullable=False),
        pa.field("shape", pa.list_(pa.int32()), nullable=False),
        pa.field("spacing", pa.list_(pa.float64()), nullable=False),
        pa.field("class_voxels", pa.map_(pa.string(), pa.int64())),
        pa.field("split", pa.string()),
        pa.field("source", pa.string()),
    ],
)

REJECTS_SCHEMA = make_schema(
    "rejects",
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
    ],
)

#: Registered schemas by name; other modules add theirs (e.g. ``SCHEMAS["synthesis"] = ...``).
SCHEMAS: dict[str, pa.Schema] = {"cases": CASES_SCHEMA, "rejects": REJECTS_SCHEMA}


def resolve_schema(schema: pa.Schema | str) -> pa.Schema:
    if isinstance(schema, pa.Schema):
        return schema
    if isinstance(schema, str) and schema in SCHEMAS:
        return SCHEMAS[schema]
    raise ValueError(f"schema must be a pyarrow.Schema or one of {sorted(SCHEMAS)}, got {schema!r}")


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _check_value(value: Any, typ: pa.DataType, where: str) -> None:
    """Raise ValueError when ``value`` does not fit Arrow type ``typ`` (nested nulls allowed)."""
    if value is None:
        return
    bad = ValueError(f"{where}: expected {typ}, got {_describe(value)}")
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        if not isinstance(value, str):
            raise bad
    elif pa.types.is_boolean(typ):
        if not isinstance(value, (bool, np.bool_)):
            raise bad
    elif pa.types.is_integer(typ):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise bad
        info = np.iinfo(typ.to_pandas_dtype())
        if not info.min <= int(value) <= info.max:
            raise ValueError(f"{where}: {value} out of range for {typ}")
    elif pa.types.is_floating(typ):
        if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, float, np.integer, np.floating)
        ):
            raise bad
    elif pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ):
        if not isinstance(value, (list, tuple, np.ndarray)):
            raise bad
        if pa.types.is_fixed_size_list(typ) and len(value) != typ.list_size:
            raise ValueError(f"{where}: expected {typ.list_size} items, got {len(value)}")
        for i, item in enumerate(value):
            _check_value(item, typ.value_type, f"{where}[{i}]")
    elif pa.types.is_map(typ):
        if isinstance(value, Mapping):
            items = list(value.items())
        elif isinstance(value, (list, tuple)) and all(
            isinstance(kv, (list, tuple)) and len(kv) == 2 for kv in value
        ):
            items = [tuple(kv) for kv in value]
        else:
            raise bad
        for k, v in items:
            if k is None:
                raise ValueError(f"{where}: map keys must not be null")
            _check_value(k, typ.key_type, f"{where} key")
            _check_value(v, typ.item_type, f"{where}[{k!r}]")
    elif pa.types.is_struct(typ):
        if not isinstance(value, Mapping):
            raise bad
        names = {typ.field(i).name for i in range(typ.num_fields)}
        extra = set(value) - names
        if extra:
            raise ValueError(f"{where}: unknown struct keys {sorted(extra)}; known {sorted(names)}")
        for i in range(typ.num_fields):
            f = typ.field(i)
            _check_value(value.get(f.name), f.type, f"{where}.{f.name}")
    else:
        try:
            pa.scalar(value, type=typ)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: expected {typ}, got {_describe(value)}: {exc}") from None


def validate_rows(rows: list[Mapping[str, Any]], schema: pa.Schema | str) -> pa.Table:
    """Check ``rows`` against ``schema`` and build the table.

    Every row must be a mapping whose keys are schema fields (absent nullable fields become
    null); non-nullable fields must be present and not None; values must fit the field types
    (no silent float -> int truncation, no str -> number parsing).

    Returns:
        ``pyarrow.Table`` with exactly ``schema``.

    Raises:
        ValueError: naming the row index, the field and the offending value.
    """
    schema = resolve_schema(schema)
    names = set(schema.names)
    columns: dict[str, list] = {n: [] for n in schema.names}
    for r, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"row {r}: expected a dict, got {_describe(row)}")
        extra = set(row) - names
        if extra:
            raise ValueError(f"row {r}: unknown fields {sorted(extra)}; schema has {schema.names}")
        for field in schema:
            value = row.get(field.name)
            if value is None and not field.nullable:
                raise ValueError(f"row {r}: required field {field.name!r} is missing or None")
            _check_value(value, field.type, f"row {r}, field {field.name!r}")
            columns[field.name].append(value)
    arrays = []
    for field in schema:
        try:
            arrays.append(pa.array(columns[field.name], type=field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
            raise ValueError(f"field {field.name!r}: {exc}") from exc
    return pa.Table.from_arrays(arrays, schema=schema)
