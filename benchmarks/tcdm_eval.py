"""Demo-preset evaluation of the trained networks, side by side in one run.

    python benchmarks/tcdm_eval.py --tcdm checkpoints/demo [--mask-only <ckpt>] [--vae <vae ckpt>] \
        [--pairs 8] [--steps 20] [--offset 1000]

1. VAE reconstruction on held-out phantoms (seeds offset..): SSIM (MONAI SSIMMetric, 3D, data range 1)
   and RMSE on the [0, 1] intensity scale (HU/2000), as the paper's Table 1 reports them.
2. Sliding-window decode (MONAI SlidingWindowInferer, Gaussian blending) of a latent 2x the window
   per axis versus decoding it whole: max / mean absolute difference in HU.
3. Held-out pairs (A, B), B@A: sample I_A from (M_A, M_B, I_B) with DDIM at equal steps and seeds,
   decode, compare with the real I_A: SSIM and RMSE, for the template-guided model and (if given)
   the mask-only ablation trained with the same budget (the paper's Table 1 / Table 4 direction).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.metrics import SSIMMetric

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fcas.diffusion.conditioning import build_c_raw  # noqa: E402
from fcas.diffusion.data import load_cases  # noqa: E402
from fcas.diffusion.sampling import decode_latent, sample  # noqa: E402
from fcas.diffusion.bundle import load_tcdm  # noqa: E402
from fcas.models.bundle import load_vae  # noqa: E402
from fcas.models.networks import VAEConfig  # noqa: E402
from fcas.models.vae import sliding_window_decode, vae_decode, vae_encode  # noqa: E402

SSIM = SSIMMetric(spatial_dims=3, data_range=1.0, win_size=7)


def ssim(x, y) -> float:
    return float(SSIM(x.clamp(0, 1), y.clamp(0, 1)).mean())


def rmse(x, y) -> float:
    return float((x.clamp(0, 1) - y.clamp(0, 1)).pow(2).mean().sqrt())


@torch.no_grad()
def eval_vae(vae, sf, cases, window):
    s, r = [], []
    for i in range(len(cases)):
        x = cases.images[i:i + 1]
        y = vae_decode(vae, vae_encode(vae, x, sf), sf)
        s.append(ssim(y, x))
        r.append(rmse(y, x))
    # sliding window: latent of a volume twice the window per axis
    z = vae_encode(vae, cases.images[:1], sf)
    whole = vae_decode(vae, z, sf).clamp(0, 1)
    t0 = time.perf_counter()
    sw = sliding_window_decode(vae, z, window, sf, overlap=0.5).clamp(0, 1)
    t_sw = time.perf_counter() - t0
    d = (sw - whole).abs() * 2000.0
    return {"vae_ssim": float(np.mean(s)), "vae_rmse": float(np.mean(r)), "n_cases": len(cases),
            "sw_latent": list(z.shape[2:]), "sw_window": list(window), "sw_max_abs_hu": float(d.max()),
            "sw_mean_abs_hu": float(d.mean()), "sw_p99_abs_hu": float(torch.quantile(d.flatten(), 0.99)),
            "sw_seconds": t_sw}


@torch.no_grad()
def eval_pairs(bundle, cases, steps, n_pairs):
    cond = bundle.condition
    schema = cond.label_schema
    s, r = [], []
    t0 = time.perf_counter()
    for i in range(n_pairs):
        a, b = i % len(cases), (i + 1) % len(cases)
        c = build_c_raw(cases.labels[a:a + 1], cases.labels[b:b + 1], cases.images[b:b + 1], schema,
                        cond.encoding, cond.mask_only)
        res = sample(bundle, c, torch.Generator().manual_seed(1000 + i), steps=steps, scheduler="ddim")
        img = decode_latent(bundle.vae, res.latent, bundle.scale_factor)
        s.append(ssim(img, cases.images[a:a + 1]))
        r.append(rmse(img, cases.images[a:a + 1]))
    return {"ssim": float(np.mean(s)), "ssim_sd": float(np.std(s)), "rmse": float(np.mean(r)),
            "rmse_sd": float(np.std(r)), "pairs": n_pairs, "steps": steps,
            "seconds_per_sample": (time.perf_counter() - t0) / n_pairs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tcdm", required=True)
    ap.add_argument("--mask-only", default=None)
    ap.add_argument("--vae", default=None, help="VAE checkpoint (default: the one inside --tcdm)")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--offset", type=int, default=1000)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    bundle = load_tcdm(a.tcdm)
    held = load_cases(f"phantom:{max(a.pairs, 2)}@{a.offset}", bundle.shape, bundle.spacing)
    out = {"held_out_seeds": [a.offset, a.offset + len(held) - 1]}
    if a.vae:
        vae, _, sf, _ = load_vae(a.vae, VAEConfig())
    else:
        vae, sf = bundle.vae, bundle.scale_factor
    lat = [s // 4 for s in bundle.shape]
    out["vae"] = eval_vae(vae, sf, held, tuple(max(1, l // 2) for l in lat))
    out["template"] = eval_pairs(bundle, held, a.steps, a.pairs)
    if a.mask_only:
        out["mask_only"] = eval_pairs(load_tcdm(a.mask_only), held, a.steps, a.pairs)
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
