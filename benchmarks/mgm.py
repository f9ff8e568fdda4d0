"""MGM speed like for like: ours vs a literal scipy Eq. 6, MONAI Rand3DElastic and TorchIO, one run.

    python benchmarks/mgm.py                 # 128^3 and 256x256x128 phantoms, 1 thread, median of 3
    python benchmarks/mgm.py --shapes 64,64,64 --reps 5 --threads 2
    python benchmarks/mgm.py --study         # closing variants + QC on phantom:20 at 64^3 (module docstring numbers)
    python benchmarks/mgm.py --json benchmarks/results/mgm_like_for_like.json

Every method gets the same mask (8 cardiac classes of a phantom over a 128 mm field of view), the
same thread count (``--threads``, default 1 because scipy's warp is single-threaded: torch, our
gather and TorchIO/SimpleITK all get that many) and the **same closing**: the paper's max-pool
(``maximum_filter(size=2)`` per class) and the union by priority.

* ``ours``    -- :func:`fcas.deform.mgm_deform(closing="maxpool", overlap="priority")`;
* ``literal`` -- :func:`literal_mgm` below: per class ``scipy.ndimage.map_coordinates(order=0)`` +
  ``maximum_filter(size=2)`` + union by priority, on a full-resolution coordinate field (exact
  per-voxel affine + the same control-grid displacement upsampled with ``scipy.ndimage.zoom``);
* ``monai``   -- ``monai.transforms.Rand3DElastic(mode="nearest")`` of the label map, then the same
  per-class max-pool closing + union (:func:`close_union`);
* ``torchio`` -- ``tio.Compose([RandomAffine, RandomElasticDeformation])`` of a ``LabelMap``
  (nearest), then :func:`close_union` (skipped when TorchIO is not installed: ``pip install .[bench]``).

The warp-only times (no closing) are printed beside them. Headline: Mvox/s of each and the ratios
of ours to each at equal threads and equal closing. Last, the distance to a memory-bandwidth bound
on this machine: a warp must at least read the source label and write the output label (2 bytes a
voxel); ``np.copyto`` of 1 GiB measures the bandwidth; bound / ours is printed.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fcas.deform.reference import literal_coordinates, literal_mgm  # noqa: E402,F401  (the reference)
from fcas.deform.params import MGMRanges, draw_params, param_rng  # noqa: E402
from fcas.labels import LabelSchema, default_schema  # noqa: E402


# ---- helpers --------------------------------------------------------------------------------------
def phantom_mask(shape, seeds=range(10)) -> tuple[np.ndarray, tuple[float, float, float], str]:
    """An 8-class cardiac phantom mask on ``shape`` over a 128 mm field of view."""
    from fcas.phantom import make_case

    shape = (shape,) * 3 if isinstance(shape, int) else tuple(shape)
    spacing = tuple(128.0 / n for n in shape)
    schema = default_schema()
    for seed in seeds:
        try:
            case = make_case(seed, shape, spacing)
        except Exception as e:  # a phantom seed that does not build: try the next
            print(f"# phantom seed {seed} failed ({type(e).__name__}: {e}); trying the next", file=sys.stderr)
            continue
        return schema.cardiac_only(case.label), spacing, f"phantom seed {seed}"
    raise RuntimeError("no phantom seed built")


def close_union(label: np.ndarray, schema: LabelSchema | None = None) -> np.ndarray:
    """The literal closing step on an already warped label map: per class max-pool(2), union by priority."""
    schema = schema or default_schema()
    closed = {int(c): ndi.maximum_filter((label == c).astype(np.uint8), size=2, mode="constant", cval=0)
              for c in np.flatnonzero(np.bincount(label.ravel(), minlength=256)[1:]) + 1}
    return schema.union(closed, label.shape)


def timeit(fn, reps: int) -> tuple[float, object]:
    fn()  # warm-up
    ts, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def load_note() -> str:
    try:
        return "loadavg %.2f %.2f %.2f on %d cpus" % (*os.getloadavg(), os.cpu_count() or 0)
    except OSError:
        return "loadavg n/a"


def bandwidth_gbs(n_bytes: int = 1 << 30, reps: int = 3) -> float:
    """Copy bandwidth (read + write bytes per second) of ``np.copyto`` over ``n_bytes``."""
    a = np.ones(n_bytes, np.uint8)
    b = np.empty_like(a)
    t, _ = timeit(lambda: np.copyto(b, a), reps)
    return 2 * n_bytes / t / 1e9


# ---- speed ----------------------------------------------------------------------------------------
def speed_at(shape, args) -> dict:
    import torch
    from monai.transforms import Rand3DElastic

    from fcas.deform import mgm_deform

    torch.set_num_threads(args.threads)
    mask, spacing, what = phantom_mask(shape)
    nvox = mask.size
    params = draw_params(MGMRanges(), param_rng(0, 0, 0))
    print(f"\n# {what}, {mask.shape} @ {'x'.join(f'{s:g}' for s in spacing)} mm, {len(np.unique(mask)) - 1} classes, "
          f"{args.threads} thread(s), median of {args.reps}; {load_note()}")
    t = {}
    t["ours"], out_ours = timeit(lambda: mgm_deform(mask, spacing, params, closing="maxpool", overlap="priority",
                                                     num_threads=args.threads), args.reps)
    t["ours, no closing"], _ = timeit(lambda: mgm_deform(mask, spacing, params, closing="none", overlap="priority",
                                                          num_threads=args.threads), args.reps)
    coords = literal_coordinates(params, mask.shape, spacing)
    t["literal"], out_lit = timeit(lambda: literal_mgm(mask, literal_coordinates(params, mask.shape, spacing),
                                                       closing="maxpool"), args.reps)
    t["literal, no closing"], _ = timeit(lambda: literal_mgm(mask, coords, closing="none"), args.reps)

    elastic = Rand3DElastic(sigma_range=(5, 8), magnitude_range=(0, 3), prob=1.0,
                            rotate_range=(math.radians(12),) * 3, shear_range=(0.04,) * 3,
                            translate_range=(4 / spacing[0],) * 3, scale_range=(0.08,) * 3,
                            mode="nearest", padding_mode="zeros")
    elastic.set_random_state(0)
    x = torch.from_numpy(mask[None].astype(np.float32))
    warp_monai = lambda: elastic(x)[0].numpy().astype(np.uint8)  # noqa: E731
    t["monai, no closing"], _ = timeit(warp_monai, args.reps)
    t["monai"], _ = timeit(lambda: close_union(warp_monai()), args.reps)
    try:
        import torchio as tio

        tr = tio.Compose([tio.RandomAffine(scales=0.08, degrees=12, translation=4, image_interpolation="nearest"),
                          tio.RandomElasticDeformation(num_control_points=7, max_displacement=3 * spacing[0])])
        subj = tio.Subject(label=tio.LabelMap(tensor=torch.from_numpy(mask[None].astype(np.int16)),
                                              affine=np.diag([*spacing, 1.0])))
        torch.manual_seed(0)
        warp_tio = lambda: tr(subj)["label"].data[0].numpy().astype(np.uint8)  # noqa: E731
        t["torchio, no closing"], _ = timeit(warp_tio, args.reps)
        t["torchio"], _ = timeit(lambda: close_union(warp_tio()), args.reps)
    except ImportError:
        print("# torchio not installed: skipped (pip install .[bench])")
    agree = float((out_ours == out_lit).mean()) * 100
    mv = {k: nvox / v / 1e6 for k, v in t.items()}
    for k in t:
        print(f"  {k:22s} {t[k] * 1e3:9.1f} ms  {mv[k]:8.2f} Mvox/s")
    ratios = {k: t[k] / t["ours"] for k in ("literal", "monai", "torchio") if k in t}
    ratios_warp = {k: t[f"{k}, no closing"] / t["ours, no closing"] for k in ("literal", "monai", "torchio")
                   if f"{k}, no closing" in t}
    print(f"  ours == literal on {agree:.4f}% of voxels")
    print("  ours vs (same threads, same max-pool closing): " + ", ".join(f"{k} {r:.1f}x" for k, r in ratios.items()))
    print("  warp alone:                                     " + ", ".join(f"{k} {r:.1f}x" for k, r in ratios_warp.items()))
    return {"shape": list(mask.shape), "spacing": list(spacing), "threads": args.threads, "reps": args.reps,
            "seconds": t, "mvox_per_s": mv, "ratio_vs_ours": ratios, "ratio_vs_ours_warp_only": ratios_warp,
            "agreement_with_literal_pct": agree}


def speed(args) -> dict:
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    res = [speed_at(sh, args) for sh in shapes]
    bw = bandwidth_gbs()
    big = res[-1]
    bound = bw * 1e9 / 2 / 1e6   # Mvox/s if a voxel cost only its 2 bytes of traffic
    print(f"\nmemory bandwidth (np.copyto, read + write): {bw:.1f} GB/s -> bound {bound:.0f} Mvox/s at 2 B a voxel; "
          f"ours at {tuple(big['shape'])}: {big['mvox_per_s']['ours']:.1f} Mvox/s = "
          f"{bound / big['mvox_per_s']['ours']:.0f}x below the bound ({args.threads} thread(s))")
    for r in res:
        print(f"mgm_speedup_vs_literal[{'x'.join(map(str, r['shape']))}]={r['ratio_vs_ours']['literal']:.1f}")
    record = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "results": res, "bandwidth_gbs": bw,
              "bound_mvox_per_s": bound}
    if args.json:
        import json

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1))
    return record


# ---- closing study on phantoms ----------------------------------------------------------------------
def study(args) -> None:
    from fcas.deform import load_mgm_config, mask_stats, mgm_deform, mgm_with_qc, prepare_template, qc_compare
    from fcas.phantom import make_case

    cfg = load_mgm_config("default")
    schema = default_schema()
    size, spacing = 64, (2.0, 2.0, 2.0)
    variants = (("none", "keep"), ("maxpool", "priority"), ("maxpool", "keep"), ("closing", "priority"),
                ("closing", "keep"))
    recs = {v: [] for v in variants}
    runs, built = [], []
    for seed in range(args.phantoms):
        try:
            case = make_case(seed, (size,) * 3, spacing)
        except Exception as e:
            print(f"# phantom seed {seed} failed to build: {type(e).__name__}: {e}")
            continue
        built.append(seed)
        mask, before = prepare_template(case.label, cfg, schema)
        for d in range(args.draws):
            p = draw_params(cfg.ranges, param_rng(0, seed, d))
            for v in variants:
                out = mgm_deform(mask, spacing, p, closing=v[0], overlap=v[1], schema=schema)
                recs[v].append(qc_compare(before, mask_stats(out, cfg.qc, schema), cfg.qc, schema))
        runs.append(mgm_with_qc(case.label, spacing, run_seed=0, sample_id=seed, cfg=cfg, schema=schema))
    n = len(recs[variants[0]])
    print(f"# phantom:{args.phantoms} at {size}^3 @ 2 mm ({len(built)} built), default ranges, {args.draws} draws each "
          f"= {n} deformations per variant, single QC try; {load_note()}")
    print("closing, overlap  | QC pass | a class gains components | coronary detached | mean |vol ratio - 1| | "
          "coronary vol ratio | LV vol ratio | myo vol ratio")
    for v in variants:
        qs = recs[v]
        pass_rate = np.mean([q.passed for q in qs])
        comps = np.mean([any(q.components_after[k] > q.components_before[k] for k in q.components_after) for q in qs])
        det = np.mean([q.coronary_attached_after < min(q.coronary_attached_before, cfg.qc.coronary_attached_min) for q in qs])
        dev = np.mean([abs(r - 1) for q in qs for r in q.volume_ratio.values() if not math.isnan(r)])
        cor = [q.volume_ratio["coronary_arteries"] for q in qs]
        lv = [q.volume_ratio["left_ventricle"] for q in qs]
        myo = [q.volume_ratio["lv_myocardium"] for q in qs]
        print(f"{v[0] + ', ' + v[1]:17s} | {pass_rate:7.2f} | {comps * 100:23.0f}% | {det * 100:16.0f}% | {dev:20.3f} | "
              f"{np.mean(cor):.2f} +- {np.std(cor):.2f}      | {np.mean(lv):.2f} +- {np.std(lv):.2f} | "
              f"{np.mean(myo):.2f} +- {np.std(myo):.2f}")
    ok = [r for r in runs if r.qc.passed]
    print(f"\nmgm_with_qc (closing={cfg.closing}, overlap={cfg.overlap}, max_tries={cfg.max_tries}): "
          f"{len(ok)}/{len(runs)} passed, "
          f"first-try pass {np.mean([r.tries == 1 and r.qc.passed for r in runs]):.2f}, "
          f"mean tries {np.mean([r.tries for r in runs]):.2f}")
    print("per-class volume ratio of passing samples (mean, min, max); components after (max):")
    for name in schema.cardiac:
        r = [x.qc.volume_ratio[name] for x in ok]
        c = [x.qc.components_after[name] for x in ok]
        if r:
            print(f"  {name:18s} {np.mean(r):.3f}  [{min(r):.3f}, {max(r):.3f}]  comps <= {max(c)}")
    if ok:
        print(f"  coronary attached (min over passing): {min(x.qc.coronary_attached_after for x in ok):.3f}; "
              f"LV wrapped by myocardium (min after/before): "
              f"{min(x.qc.wrap_after['left_ventricle__lv_myocardium'] / x.qc.wrap_before['left_ventricle__lv_myocardium'] for x in ok):.3f}")
    fails = {}
    for x in runs:
        for f in x.failures[:-1] if x.qc.passed else x.failures:
            for reason in f:
                key = " ".join(reason.split()[:2])
                fails[key] = fails.get(key, 0) + 1
    print(f"failure reasons over all tries: {fails}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="128,128,128;256,256,128", help="';'-separated shapes")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--study", action="store_true", help="closing variants + QC on phantoms instead of speed")
    ap.add_argument("--phantoms", type=int, default=20)
    ap.add_argument("--draws", type=int, default=3)
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    if args.study:
        study(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
