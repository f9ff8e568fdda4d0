"""Storage layer: fsspec URIs (local, ``file://``, ``s3://``), NIfTI volumes, Parquet manifests."""
from fcas.io.manifest import (
    CASES_SCHEMA,
    REJECTS_SCHEMA,
    SCHEMAS,
    make_schema,
    read_cases,
    read_manifest_dedup,
    read_table,
    write_table,
)
from fcas.io.nifti import NiftiError, NiftiHeader, Volume, read_header, read_nifti, write_nifti
from fcas.io.storage import atomic_write_bytes, exists, get_fs, glob, join, listdir, makedirs, read_bytes, remove

__all__ = [
    "CASES_SCHEMA",
    "REJECTS_SCHEMA",
    "SCHEMAS",
    "make_schema",
    "read_cases",
    "read_manifest_dedup",
    "read_table",
    "write_table",
    "NiftiError",
    "NiftiHeader",
    "Volume",
    "read_header",
    "read_nifti",
    "write_nifti",
    "atomic_write_bytes",
    "exists",
    "get_fs",
    "glob",
    "join",
    "listdir",
    "makedirs",
    "read_bytes",
    "remove",
]
