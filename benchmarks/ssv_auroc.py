"""Does the SSV confidence map mark the errors? Every SSV variant scored on the same samples, in one run.

    python benchmarks/ssv_auroc.py [--checkpoint checkpoints/demo] [--pairs 4] [--steps 10] \
        [--offset 7000] [--threshold 0.05] [--segnet <CAL checkpoint>] [--json <file>]

Held-out pairs ``(A, B)`` of phantoms (seeds ``offset ..``, never trained on), direction B@A, with no
MGM deformation, so the true image ``I_A`` of the mask the sample follows is known. Each pair is
sampled once (DDIM, ``--steps``) collecting the predicted clean latent x̂0 and the noisy latent Z_t
at every step; every variant's confidence map is then computed from those same trajectories:

* what is collected: x̂0 or Z_t;
* where the variance is taken: latent space (channel mean, upsampled) or image space (each
  intermediate decoded by the VAE, as the paper);
* which steps: every k-th (k = 1, 2, 4) from the first step, or from the late half only;
* normalisation per volume: by the 0.999 quantile or by the maximum.

Scores (1 - CM is the predicted "unreliability"):

* ``auroc_error``: AUROC (MONAI ``compute_roc_auc``) of 1 - CM for the error voxels
  ``|sample - I_A| > threshold`` (0.05 = 100 HU); 0.5 is chance;
* ``pearson``: Pearson r of CM with ``|sample - I_A|`` (negative is good);
* ``auroc_seg`` (with ``--segnet``): AUROC of 1 - CM for the voxels where a segmentation net trained
  on real cases disagrees with the label the sample was made from (M_A, cardiac classes).

Prints the variants sorted by ``auroc_error`` and writes them as JSON.
"""
import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import compute_roc_auc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fcas.diffusion.conditioning import build_c_raw, unit_to_hu  # noqa: E402
from fcas.diffusion.data import load_cases  # noqa: E402
from fcas.diffusion.sampling import decode_latent, sample  # noqa: E402
from fcas.diffusion.ssv import normalize_variance, ssv_variance  # noqa: E402
from fcas.diffusion.bundle import load_tcdm  # noqa: E402


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    pos = positive.reshape(-1).astype(np.float32)
    if pos.min() == pos.max():
        return float("nan")
    return float(compute_roc_auc(torch.from_numpy(score.reshape(-1).astype(np.float32)), torch.from_numpy(pos)))


def confidence(inter: list[torch.Tensor], space: str, quantile: float, out_shape, decoded=None) -> np.ndarray:
    if space == "image":
        var = ssv_variance(decoded)
    else:
        var = ssv_variance(inter).mean(dim=1, keepdim=True)
        var = F.interpolate(var, size=out_shape, mode="trilinear", align_corners=False)
    return (1.0 - normalize_variance(var, quantile))[0, 0].numpy()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="checkpoints/demo")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--offset", type=int, default=7000)
    ap.add_argument("--threshold", type=float, default=0.05, help="error voxel: |sample - I_A| above this ([0, 1] scale)")
    ap.add_argument("--segnet", default=None, help="CAL checkpoint of a net trained on real cases (optional)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    for path in filter(None, (a.checkpoint, a.segnet)):
        if not Path(path).exists():
            ap.error(f"checkpoint not found: {path}")
    if a.pairs < 1 or a.steps < 4:
        ap.error("--pairs must be >= 1 and --steps >= 4")
    torch.set_num_threads(2)
    bundle = load_tcdm(a.checkpoint)
    bundle.vae.float()
    cond = bundle.condition
    cases = load_cases(f"phantom:{a.pairs + 1}@{a.offset}", bundle.shape, bundle.spacing)
    predictor = None
    if a.segnet:
        from fcas.cal.predict import load_predictor

        predictor = load_predictor(a.segnet)
    cardiac = np.zeros(256, dtype=np.uint8)
    cardiac[list(cond.label_schema.cardiac_ids)] = 1
    variants = list(itertools.product(("x0", "latent"), ("latent", "image"), (1, 2, 4), (0.0, 0.5), (0.999, 1.0)))
    rows: dict[tuple, list[dict]] = {v: [] for v in variants}
    t0 = time.perf_counter()
    sample_ssim = []
    for i in range(a.pairs):
        ia, ib = i, i + 1
        c = build_c_raw(cases.labels[ia:ia + 1], cases.labels[ib:ib + 1], cases.images[ib:ib + 1],
                        cond.label_schema, cond.encoding, cond.mask_only)
        traj = {}
        for collect in ("x0", "latent"):
            g = torch.Generator().manual_seed(int(np.random.default_rng([a.offset, i]).integers(2**62)))
            with torch.no_grad():
                res = sample(bundle, c, g, steps=a.steps, scheduler="ddim", collect_every=1, collect=collect)
            traj[collect] = res.intermediates
        with torch.no_grad():
            img = decode_latent(bundle.vae, res.latent, bundle.scale_factor).clamp(0, 1)
            decoded = {k: [decode_latent(bundle.vae, z, bundle.scale_factor) for z in v] for k, v in traj.items()}
        target = cases.images[ia:ia + 1]
        err = (img - target).abs()[0, 0].numpy()
        from fcas.metrics.image import ssim

        sample_ssim.append(ssim(img[0, 0], target[0, 0]))
        disagree = None
        if predictor is not None:
            pred = predictor(unit_to_hu(img)[0, 0].numpy())
            lab = cases.labels[ia].numpy()
            disagree = pred != np.where(cardiac[lab] > 0, lab, 0)
        for v in variants:
            collect, space, every, start, q = v
            idx = list(range(int(start * a.steps), a.steps, every))
            if len(idx) < 2:
                continue
            cm = confidence([traj[collect][j] for j in idx], space, q, img.shape[2:],
                            [decoded[collect][j] for j in idx])
            row = {"auroc_error": auroc(1.0 - cm, err > a.threshold),
                   "pearson": float(np.corrcoef(cm.reshape(-1), err.reshape(-1))[0, 1]),
                   "error_fraction": float((err > a.threshold).mean()), "cm_mean": float(cm.mean())}
            if disagree is not None:
                row["auroc_seg"] = auroc(1.0 - cm, disagree)
                row["disagree_fraction"] = float(disagree.mean())
            rows[v].append(row)
        print(f"pair {i}: SSIM {sample_ssim[-1]:.3f}, error voxels {float((err > a.threshold).mean()):.3f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    table = []
    for v, rs in rows.items():
        if not rs:
            continue
        collect, space, every, start, q = v
        table.append({"collect": collect, "space": space, "every": every, "start": start, "quantile": q,
                      **{k: float(np.nanmean([r[k] for r in rs])) for k in rs[0]}})
    table.sort(key=lambda r: -r["auroc_error"])
    keys = ["auroc_error", "pearson"] + (["auroc_seg"] if predictor is not None else [])
    print(f"\n{a.pairs} held-out pairs, DDIM {a.steps} steps, threshold {a.threshold}, "
          f"sample SSIM {np.mean(sample_ssim):.3f}; checkpoint {a.checkpoint}")
    print(f"{'collect':8s}{'space':7s}{'every':>6s}{'start':>6s}{'quant':>7s}" + "".join(f"{k:>13s}" for k in keys))
    for r in table:
        print(f"{r['collect']:8s}{r['space']:7s}{r['every']:6d}{r['start']:6.1f}{r['quantile']:7.3f}"
              + "".join(f"{r[k]:13.3f}" for k in keys))
    out = {"checkpoint": a.checkpoint, "pairs": a.pairs, "steps": a.steps, "threshold": a.threshold,
           "offset": a.offset, "segnet": a.segnet, "sample_ssim": float(np.mean(sample_ssim)), "variants": table}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
