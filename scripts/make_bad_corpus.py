"""Write the bad-input corpus committed in tests/data/bad_inputs/ (deterministic, ~0.3 MB).

    python scripts/make_bad_corpus.py                       # rewrite tests/data/bad_inputs/
    python scripts/make_bad_corpus.py --out /tmp/corpus     # elsewhere (tests regenerate and compare)

Three folders, each with good items beside the bad ones:

* ``cases/``: image/label NIfTI pairs for ``prepare`` (and the NIfTI readers): the generators of
  ``tests/corpus.py`` (``write_corpus``, used by tests/test_prepare.py) on a coarse 20x22x18 grid,
  plus an image with +-inf voxels. gzip headers get mtime 0 so the bytes do not depend on the clock.
* ``manifests/``: ``cases.parquet``-style manifests for ``TemplateLibrary.from_manifest``.
* ``checkpoints/``: checkpoint folders (``checkpoint.json`` + ``config.json`` + ``*.pt``) for
  ``load_checkpoint`` / ``load_tcdm``, with tiny state dicts (not real networks).

``kinds.json`` lists every item with its kind ("good" or the bad kind). Nothing here is edited by
hand: change this script and rerun it.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from fcas.io import manifest  # noqa: E402
from fcas.models.checkpoint import save_checkpoint  # noqa: E402
from tests.corpus import _save, write_corpus  # noqa: E402

DEFAULT_OUT = ROOT / "tests" / "data" / "bad_inputs"
SHAPE = (20, 22, 18)          # source grid of every case: 120 x 110 x 126 mm, like tests/corpus.py's default
SPACING = (6.0, 5.0, 7.0)
N_GOOD = 3


def _zero_gzip_mtime(folder: Path) -> None:
    """Set the gzip header's MTIME field (bytes 4..7; not covered by the CRC) to 0 in every .gz file."""
    for p in sorted(folder.glob("*.gz")):
        data = bytearray(p.read_bytes())
        if len(data) >= 10 and data[:2] == b"\x1f\x8b":
            data[4:8] = b"\x00\x00\x00\x00"
            p.write_bytes(bytes(data))


def write_cases(folder: Path) -> dict[str, str]:
    kinds = write_corpus(folder, n_good=N_GOOD, shape=SHAPE, spacing=SPACING)
    # NaN is in write_corpus; +-inf beside it
    src = nib.load(str(folder / "good0_image.nii.gz"))
    img, affine = np.asarray(src.dataobj).astype(np.float32), src.affine
    lab_src = folder / "good0_label.nii.gz"
    img[2, 3, 4], img[5, 6, 7] = np.inf, -np.inf
    _save(img, affine, folder / "infimage_image.nii.gz", np.float32)
    shutil.copyfile(lab_src, folder / "infimage_label.nii.gz")
    kinds["infimage"] = "infimage"
    _zero_gzip_mtime(folder)
    return kinds


def _case_rows(ids_splits: list[tuple[str, str]]) -> list[dict]:
    return [{"case_id": cid, "image_uri": f"cases/{cid}_image.nii.gz", "label_uri": f"cases/{cid}_label.nii.gz",
             "shape": [20, 22, 18], "spacing": [6.0, 5.0, 7.0], "class_voxels": {"left_ventricle": 10},
             "split": split, "source": f"{cid}_image.nii.gz"} for cid, split in ids_splits]


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_manifests(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    schema = manifest.CASES_SCHEMA
    good = _parquet_bytes(pa.Table.from_pylist(
        _case_rows([("good0", "template"), ("good1", "template"), ("good2", "reference")]), schema=schema))
    items = {
        "good": good,
        "zerobyte": b"",
        "notparquet": b"case_id,image_uri,label_uri,split\ngood0,a.nii.gz,b.nii.gz,template\n",
        "truncated": good[: len(good) // 2],
        "norows": _parquet_bytes(schema.empty_table()),
        "notemplate": _parquet_bytes(pa.Table.from_pylist(_case_rows([("good0", "train"), ("good1", "test")]),
                                                          schema=schema)),
        "nosplitcolumn": _parquet_bytes(pa.table({"case_id": ["good0"], "image_uri": ["cases/good0_image.nii.gz"],
                                                  "label_uri": ["cases/good0_label.nii.gz"]})),
        # ids that would become file names downstream (previews, exports): must be refused
        "unsafeid": _parquet_bytes(pa.Table.from_pylist(
            _case_rows([("../../etc/cron.d/x", "template"), ("good1", "reference")]), schema=schema)),
    }
    for name, data in items.items():
        (folder / f"{name}.parquet").write_bytes(data)
    return {f"{name}.parquet": ("good" if name == "good" else name) for name in items}


class _Exec:
    """Pickles to ``exec(code)``: what an unsafe ``torch.load`` would run (writes a marker file)."""

    CODE = ("import os; p = os.environ.get('FCAS_PWNED_MARKER'); "
            "p and open(p, 'w').write('torch.load ran code from a checkpoint')")

    def __reduce__(self):
        return (exec, (self.CODE,))


def _sd() -> dict:
    return {"weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "bias": torch.zeros(2)}


def _pt(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _pin(ck: Path) -> None:
    """Rewrite checkpoint.json so every file's sha256 matches what is on disk now (an attacker who
    rewrote the weights and their manifest)."""
    man = json.loads((ck / "checkpoint.json").read_text())
    man["files"] = {n: hashlib.sha256((ck / f"{n}.pt").read_bytes()).hexdigest() for n in man["files"]}
    man["config_sha256"] = hashlib.sha256((ck / "config.json").read_bytes()).hexdigest()
    (ck / "checkpoint.json").write_bytes(json.dumps(man, indent=2, sort_keys=True).encode())


def write_checkpoints(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"kind": "corpus", "note": "tiny state dicts, not a network"}

    def make(name: str) -> Path:
        ck = folder / name
        save_checkpoint(str(ck), config=config, state_dicts={"unet": _sd()}, step=1)
        return ck

    make("good")
    ck = make("incomplete")                     # a write interrupted before checkpoint.json
    (ck / "checkpoint.json").unlink()
    ck = make("badmanifest")                    # checkpoint.json cut short
    (ck / "checkpoint.json").write_bytes((ck / "checkpoint.json").read_bytes()[:40])
    ck = make("tamperedweights")                # unet.pt changed after checkpoint.json pinned it
    data = bytearray((ck / "unet.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (ck / "unet.pt").write_bytes(bytes(data))
    ck = make("truncatedweights")               # unet.pt cut in half
    (ck / "unet.pt").write_bytes((ck / "unet.pt").read_bytes()[:200])
    ck = make("tamperedconfig")                 # config.json edited after checkpoint.json pinned it
    (ck / "config.json").write_bytes(b'{"kind": "corpus", "note": "edited"}')
    ck = make("missingweights")                 # a file named in checkpoint.json is gone
    (ck / "unet.pt").unlink()
    ck = make("pickleexploit")                  # a pickle that runs code, pinned by a rewritten manifest
    (ck / "unet.pt").write_bytes(_pt({"weight": _Exec()}))
    _pin(ck)
    ck = make("notastatedict")                  # a tensor list, not a dict, with a matching sha256
    (ck / "unet.pt").write_bytes(_pt([torch.zeros(2)]))
    _pin(ck)
    return {p.name: ("good" if p.name == "good" else p.name) for p in sorted(folder.iterdir())}


def make_corpus(out: Path) -> dict:
    """(Re)write the whole corpus under ``out``; returns the kinds table also saved as kinds.json."""
    out = Path(out)
    for sub in ("cases", "manifests", "checkpoints"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    kinds = {"cases": write_cases(out / "cases"), "manifests": write_manifests(out / "manifests"),
             "checkpoints": write_checkpoints(out / "checkpoints")}
    (out / "kinds.json").write_text(json.dumps(kinds, indent=2, sort_keys=True) + "\n")
    return kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args()
    kinds = make_corpus(a.out)
    n = sum(len(v) for v in kinds.values())
    size = sum(p.stat().st_size for p in a.out.rglob("*") if p.is_file())
    print(f"bad-input corpus: {n} items ({', '.join(f'{k} {len(v)}' for k, v in kinds.items())}), "
          f"{size / 1024:.0f} KiB -> {a.out}")


if __name__ == "__main__":
    main()
