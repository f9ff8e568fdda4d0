"""The CPU side of one paper-size sample: the synthesis writer old vs new, side by side in one run,
and the MGM stage beside it.

    python benchmarks/writer.py [--shape 512 512 256] [--spacing 0.4 0.4 0.5] [--reps 2] \
        [--gpus 16 --samples-per-s-per-gpu 0.1006] [--json benchmarks/results/writer_paper.json]

Content: phantom case 0 drawn at ``--shape`` (the paper's 512x512x256 grid by default, so the image
carries the phantom's CT noise, which is what gzip spends its time on), its label map, and a
confidence map shaped like a real one (smooth, mostly near 1, lower at structure edges: the label
edges blurred, plus low-frequency variation), in [0, 1].

Writers, each writing the three volumes of one sample (image int16, label uint8, confidence uint8
steps of 1/255):

* ``old``: the writer before this benchmark existed: nibabel ``to_bytes`` + zlib level 1, the
  confidence scaled through float64, the three files one after another.
* ``isal L<k>``: :func:`fcas.synthesis.outputs.write_sample` with ISA-L igzip level k (the new
  default is :data:`fcas.io.nifti.ISAL_LEVEL`), one thread; ``isal L1, 3 threads``: the same with the
  three files written concurrently (``resources.writer_cpus >= 3``).
* ``zlib L6``: gzip's default level, for the size reference.

Per writer: CPU seconds of the process (all threads) and wall seconds per sample (best of
``--reps``), bytes of the three files, and their ratios to ``old``. Every file written is read
back with nibabel and compared voxel for voxel with the old writer's (and with SimpleITK when it is
installed). The preview PNG (:func:`fcas.preview.sample_png`), optional at scale
(``preview=false``), is timed on its own, and so is the MGM stage (:func:`fcas.deform.mgm_with_qc`
with the job's default MGM config, one thread, QC tries included) on the same case. The last lines: CPU cores the writer needs to keep
``--gpus`` samplers busy at ``--samples-per-s-per-gpu`` (default: the H200 plan's paper-size rate,
``python jobs/plan.py preset=paper gpu=h200-141gb``), old vs new.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fcas.io import nifti, storage  # noqa: E402
from fcas.phantom import make_case  # noqa: E402
from fcas.synthesis.outputs import sample_uris, write_sample  # noqa: E402


def confidence_like(label: np.ndarray, seed: int = 0) -> np.ndarray:
    """A confidence map with a real one's look: near 1 in flat regions, dips at label edges, smooth."""
    edges = (ndimage.morphological_gradient(label, size=3) > 0).astype(np.float32)
    dip = ndimage.gaussian_filter(edges, 2.0)
    rng = np.random.default_rng(seed)
    low = ndimage.zoom(rng.random((8, 8, 4), dtype=np.float32), np.asarray(label.shape) / (8, 8, 4), order=1)
    return np.clip(0.97 - 1.5 * dip - 0.15 * low[: label.shape[0], : label.shape[1], : label.shape[2]], 0, 1)


def old_write_sample(out: str, sid: int, image, label, conf, affine) -> None:
    """The writer as it was before ISA-L (kept here as the reference): zlib 1, float64 scaling, serial."""
    uris = sample_uris(out, sid, preview=False)
    for uri, arr, kind in ((uris["image_uri"], image, "image"), (uris["label_uri"], label, "label"),
                           (uris["confidence_uri"], np.clip(conf, 0, 1), "fraction")):
        if kind == "fraction":
            data = np.rint(arr.astype(np.float64) * nifti.FRACTION_LEVELS).astype(np.uint8)
        elif kind == "image":
            data = np.clip(np.rint(arr), -32768, 32767).astype(np.int16)
        else:
            data = arr.astype(np.uint8)
        img = nifti.nifti_image(data, affine, kind)   # the same header; nibabel's own serialisation
        storage.atomic_write_bytes(uri, gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))


def timed(fn, reps: int) -> tuple[float, float]:
    best_cpu, best_wall = float("inf"), float("inf")
    for _ in range(reps):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        best_cpu, best_wall = min(best_cpu, time.process_time() - c0), min(best_wall, time.perf_counter() - w0)
    return best_cpu, best_wall


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 512, 256])
    ap.add_argument("--spacing", type=float, nargs=3, default=[0.4, 0.4, 0.5])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--gpus", type=int, default=16)
    ap.add_argument("--samples-per-s-per-gpu", type=float, default=0.1006,
                    help="sampler rate per GPU (default: the paper-size H200 plan)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cache = Path(tempfile.gettempdir()) / f"fcas_writer_bench_phantom_{'x'.join(map(str, a.shape))}.npz"
    if cache.is_file():   # drawing the paper-size phantom takes minutes; keep it between runs
        z = np.load(cache)
        image, label, affine = z["image"], z["label"], z["affine"]
    else:
        case = make_case(0, tuple(a.shape), tuple(a.spacing))
        image, label, affine = case.image, case.label, case.affine
        np.savez(cache, image=image, label=label, affine=affine)
    conf = confidence_like(label)
    mvox = image.size / 1e6
    print(f"content: phantom 0 at {tuple(a.shape)} ({mvox:.1f} Mvox), drawn or loaded in {time.perf_counter() - t0:.0f} s; "
          f"confidence mean {conf.mean():.3f}", flush=True)

    tmp = tempfile.mkdtemp(prefix="fcas_writer_bench_")
    writers = {
        "old (zlib L1, float64 CM, serial)": lambda out: old_write_sample(out, 0, image, label, conf, affine),
    }
    for lv in (0, 1, 2, 3):
        writers[f"isal L{lv}"] = (lambda lv: lambda out: _with_level(lv, lambda: write_sample(out, 0, image, label, conf, affine)))(lv)
    writers[f"isal L{nifti.ISAL_LEVEL}, 3 threads"] = lambda out: write_sample(out, 0, image, label, conf, affine, threads=3)
    writers["zlib L6"] = lambda out: _with_codec("zlib", 6, lambda: write_sample(out, 0, image, label, conf, affine))

    results, ref, dirs = {}, None, {}
    for idx, (name, fn) in enumerate(writers.items()):
        out = dirs[name] = os.path.join(tmp, f"writer{idx}")
        cpu, wall = timed(lambda: fn(out), a.reps)
        uris = sample_uris(out, 0, preview=False)
        files = {k: uris[k] for k in ("image_uri", "label_uri", "confidence_uri")}
        nbytes = {k: os.path.getsize(u) for k, u in files.items()}
        arrays = {k: nifti.read_nifti(u).array for k, u in files.items()}
        if ref is None:
            ref = arrays
        same = all(np.array_equal(arrays[k], ref[k]) for k in files)
        results[name] = {"cpu_s": cpu, "wall_s": wall, "bytes": sum(nbytes.values()), "bytes_per_file": nbytes,
                         "reads_back_identical": bool(same)}
        print(f"  {name:34s} cpu {cpu:6.2f} s  wall {wall:6.2f} s  {sum(nbytes.values()) / 1e6:7.1f} MB  "
              f"identical {same}", flush=True)
        if not same:
            raise SystemExit(f"{name}: files do not read back like the old writer's")
    try:
        import SimpleITK as sitk

        new = sample_uris(dirs[f"isal L{nifti.ISAL_LEVEL}"], 0, preview=False)
        old = sample_uris(next(iter(dirs.values())), 0, preview=False)
        sitk_same = all(np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(new[k])),
                                       sitk.GetArrayFromImage(sitk.ReadImage(old[k])))
                        for k in ("image_uri", "label_uri", "confidence_uri"))
    except ImportError:
        sitk_same = None
    print(f"SimpleITK reads new and old files identically: {sitk_same}")

    from fcas.preview import sample_png

    p_cpu, p_wall = timed(lambda: sample_png(image, label, conf, None, title="sample 0", affine=affine), a.reps)
    print(f"preview PNG: cpu {p_cpu:.2f} s, wall {p_wall:.2f} s (off with preview=false)")

    from fcas.deform import load_mgm_config, mgm_with_qc

    m_tries = []

    def mgm():
        m_tries.append(mgm_with_qc(label, tuple(a.spacing), run_seed=0, sample_id=0, cfg=load_mgm_config("default")).tries)

    m_cpu, m_wall = timed(mgm, 1)
    print(f"MGM stage (deform + QC, {m_tries[-1]} tries, 1 thread): cpu {m_cpu:.2f} s, wall {m_wall:.2f} s")

    old_name, new_name = next(iter(results)), f"isal L{nifti.ISAL_LEVEL}"
    old_r, new_r = results[old_name], results[new_name]
    rate = a.gpus * a.samples_per_s_per_gpu
    cores = {"old, with preview": rate * (old_r["cpu_s"] + p_cpu), "new, with preview": rate * (new_r["cpu_s"] + p_cpu),
             "new, preview=false": rate * new_r["cpu_s"]}
    summary = {
        "cpu_ratio_old_over_new": old_r["cpu_s"] / new_r["cpu_s"],
        "bytes_ratio_new_over_old": new_r["bytes"] / old_r["bytes"],
        "wall_ratio_old_over_new_3_threads": old_r["wall_s"] / results[f"{new_name}, 3 threads"]["wall_s"],
        "writer_core_s_per_mvox_new": new_r["cpu_s"] / mvox,
        "writer_core_s_per_mvox_new_with_preview": (new_r["cpu_s"] + p_cpu) / mvox,
        "writer_core_s_per_mvox_old_with_preview": (old_r["cpu_s"] + p_cpu) / mvox,
        "writer_cores_for_gpus": cores,
        "mgm_core_s_per_mvox": m_cpu / mvox,
        "mgm_tries": m_tries[-1],
        "bytes_per_voxel_new": {k: v / image.size for k, v in new_r["bytes_per_file"].items()},
    }
    print(f"\nnew ({new_name}) vs old: CPU {summary['cpu_ratio_old_over_new']:.2f}x lower, "
          f"{summary['bytes_ratio_new_over_old']:.3f}x the bytes; wall with 3 threads "
          f"{summary['wall_ratio_old_over_new_3_threads']:.2f}x faster")
    print(f"writer cores to keep {a.gpus} GPUs at {a.samples_per_s_per_gpu} samples/s each busy ({rate:.2f} samples/s): "
          + ", ".join(f"{k} {v:.1f}" for k, v in cores.items()))
    shutil.rmtree(tmp, ignore_errors=True)
    record = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "shape": list(a.shape), "spacing": list(a.spacing), "mvox": mvox,
              "reps": a.reps, "writers": results, "preview": {"cpu_s": p_cpu, "wall_s": p_wall},
              "mgm": {"cpu_s": m_cpu, "wall_s": m_wall, "tries": m_tries[-1]},
              "simpleitk_identical": sitk_same, "isal_level_default": nifti.ISAL_LEVEL, **summary}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(record, indent=1))
    return record


def _with_level(level: int, fn):
    old = nifti.ISAL_LEVEL
    nifti.ISAL_LEVEL = level
    try:
        return fn()
    finally:
        nifti.ISAL_LEVEL = old


def _with_codec(codec: str, level: int, fn):
    orig = nifti.gzip_bytes
    nifti.gzip_bytes = lambda payload, _c="auto", _l=None: orig(payload, codec, level)
    try:
        return fn()
    finally:
        nifti.gzip_bytes = orig


if __name__ == "__main__":
    main()
