"""VAE reconstruction on held-out phantoms, beside the blur references, in one run.

    python benchmarks/vae_reconstruction.py [--vae checkpoints/demo] [--before <other vae>] \
        [--cases 8] [--offset 9000] [--json benchmarks/results/vae_reconstruction_demo.json]

For each held-out phantom (seeds ``offset ..``, never trained on: training uses 0..63) it scores,
on the [0, 1] intensity scale (HU / 2000) of the training data:

* the VAE's reconstruction (encode the posterior mean, decode, clip) -- and ``--before``'s, if given;
* reference degradations of the same image: Gaussian blur with sigma 0.75 and 1.6 voxels and a 2x
  down-up trilinear resize (what "blurs like a sigma-1.6 Gaussian" means);
* the noise-free phantom itself (the same case without its final noise draw): how far SSIM can go
  when the reconstruction removes the phantom's 20-35 HU noise, which a 4x, 4-channel latent
  cannot carry.

Metrics: SSIM (the project's :func:`fcas.metrics.image.ssim`, 7-voxel Gaussian window), PSNR (dB,
data range 1) and RMSE against the noisy image; SSIM against the noise-free image; SSIM and RMSE
inside the great vessels + coronaries (labels 6, 7, 8) and inside the coronaries alone (8).
Means over cases are printed as one table and written as JSON.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fcas.diffusion.conditioning import hu_to_unit  # noqa: E402
from fcas.metrics.image import psnr, rmse, ssim  # noqa: E402
from fcas.models.bundle import load_vae  # noqa: E402
from fcas.models.networks import VAEConfig  # noqa: E402
from fcas.models.vae import vae_decode, vae_encode  # noqa: E402
from fcas.phantom import make_case  # noqa: E402

VESSELS = (6, 7, 8)
CORONARY = (8,)


def scores(recon: torch.Tensor, noisy: torch.Tensor, clean: torch.Tensor, label: np.ndarray) -> dict:
    ves, cor = np.isin(label, VESSELS), np.isin(label, CORONARY)
    r = recon.clamp(0, 1)
    return {
        "ssim": ssim(r, noisy), "psnr": psnr(r, noisy), "rmse": rmse(r, noisy),
        "ssim_vs_noise_free": ssim(r, clean),
        "ssim_vessels": ssim(r, noisy, torch.from_numpy(ves)), "rmse_vessels": rmse(r, noisy, torch.from_numpy(ves)),
        "ssim_coronary": ssim(r, noisy, torch.from_numpy(cor)), "rmse_coronary": rmse(r, noisy, torch.from_numpy(cor)),
    }


@torch.no_grad()
def reconstruct(vae, x: torch.Tensor) -> torch.Tensor:
    return vae_decode(vae, vae_encode(vae, x[None, None]))[0, 0]


def down_up(x: torch.Tensor) -> torch.Tensor:
    small = F.interpolate(x[None, None], scale_factor=0.5, mode="trilinear", align_corners=False)
    return F.interpolate(small, size=x.shape, mode="trilinear", align_corners=False)[0, 0]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vae", default="checkpoints/demo", help="VAE checkpoint folder, train_vae output or TCDM bundle")
    ap.add_argument("--before", default=None, help="a second VAE to score beside it (e.g. the previous one)")
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--offset", type=int, default=9000)
    ap.add_argument("--shape", type=int, nargs=3, default=[64, 64, 64])
    ap.add_argument("--spacing", type=float, nargs=3, default=[2.0, 2.0, 2.0])
    ap.add_argument("--json", default=None, help="write the table here as JSON")
    a = ap.parse_args(argv)
    for spec in filter(None, (a.vae, a.before)):
        if not Path(spec).exists():
            ap.error(f"VAE checkpoint not found: {spec}")
    torch.set_num_threads(2)
    models = {"vae": load_vae(a.vae, VAEConfig())[0]}
    if a.before:
        models["before"] = load_vae(a.before, VAEConfig())[0]
    rows: dict[str, list[dict]] = {}
    t0 = time.perf_counter()
    for i in range(a.cases):
        seed = a.offset + i
        noisy_case = make_case(seed, tuple(a.shape), tuple(a.spacing))
        clean_case = make_case(seed, tuple(a.shape), tuple(a.spacing), noise=False)
        x, x0 = hu_to_unit(noisy_case.image), hu_to_unit(clean_case.image)
        lab = noisy_case.label
        cands = {name: reconstruct(m.float(), x) for name, m in models.items()}
        cands["gauss_0.75"] = torch.from_numpy(ndimage.gaussian_filter(x.numpy(), 0.75, mode="nearest"))
        cands["gauss_1.6"] = torch.from_numpy(ndimage.gaussian_filter(x.numpy(), 1.6, mode="nearest"))
        cands["down_up_2x"] = down_up(x)
        cands["noise_free"] = x0
        for name, img in cands.items():
            rows.setdefault(name, []).append(scores(img, x, x0, lab))
    table = {name: {k: float(np.nanmean([r[k] for r in rs])) for k in rs[0]} for name, rs in rows.items()}
    keys = list(next(iter(table.values())))
    print(f"held-out phantoms: seeds {a.offset}..{a.offset + a.cases - 1}, {a.shape} at {a.spacing} mm "
          f"({time.perf_counter() - t0:.1f} s); vae={a.vae}" + (f", before={a.before}" if a.before else ""))
    print(f"{'':12s}" + "".join(f"{k:>20s}" for k in keys))
    for name, vals in table.items():
        print(f"{name:12s}" + "".join(f"{vals[k]:20.4f}" for k in keys))
    out = {"vae": a.vae, "before": a.before, "seeds": [a.offset, a.offset + a.cases - 1], "shape": a.shape,
           "spacing": a.spacing, "table": table}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
