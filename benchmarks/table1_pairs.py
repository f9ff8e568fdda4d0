"""Two TCDM bundles on Table 1's held-out pairs, scored exactly as `make reproduce` scores them, side by side.

    python benchmarks/table1_pairs.py --a <bundle> --b checkpoints/demo [--seeds 0 1 2] [--json out.json]

The pairs, seeds, DDIM steps and metrics are the full scale of ``configs/reproduce.yaml``
(:func:`fcas.reproduction.experiment.table1_seed`: SSIM and RMSE under the cardiac mask of M_A, SSIM with
both images zeroed outside it, SSIM and RMSE over the whole volume, FID and sub-volume FID on the VAE-encoder
features of ``--a``'s VAE). Both bundles get the same
initial noise for each pair and seed, so the per-seed differences are paired. ``--b`` sits in the slot
``make reproduce`` gives the mask-only ablation; any bundle can go there (e.g. the same recipe trained
another way). About 70 s per seed on 2 CPU cores for two demo bundles.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KEYS = ("ssim_mean", "rmse_mean", "ssim_zeroed_mean", "ssim_mean_whole", "rmse_mean_whole", "fid", "fid_patches")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="first TCDM bundle (its VAE also gives the FID features)")
    ap.add_argument("--b", required=True, help="second TCDM bundle")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write every seed's full result here")
    args = ap.parse_args(argv)
    for name in (args.a, args.b):
        if not (Path(name) / "checkpoint.json").is_file():
            ap.error(f"{name}: not a TCDM bundle (no checkpoint.json)")

    import torch

    from fcas.diffusion.data import load_cases
    from fcas.reproduction.experiment import table1_seed
    from fcas.reproduction.settings import ReproduceSettings

    torch.set_num_threads(args.threads)
    cfg = dict(yaml.safe_load((ROOT / "configs" / "reproduce.yaml").read_text())["scales"]["full"])
    for k in ("results", "plots"):
        cfg.pop(k, None)
    cfg.update(work="unused", checkpoint=args.a, mask_only_checkpoint=args.b, seeds=args.seeds)
    s = ReproduceSettings.from_dict(cfg)
    test = load_cases(s.test_source, s.shape, s.spacing)
    floor = load_cases(s.floor_source, s.shape, s.spacing)
    runs = []
    for seed in args.seeds:
        r = table1_seed(s, seed, test, floor)
        runs.append(r)
        print(f"seed {seed}: " + "  ".join(f"{k} {r['template'][k]:.4f} / {r['mask_only'][k]:.4f}" for k in KEYS),
              flush=True)
    print(f"{'':18s}{'a: ' + args.a:>34s}  {'b: ' + args.b:>34s}  a - b (per seed)")
    for k in KEYS:
        a = np.array([r["template"][k] for r in runs])
        b = np.array([r["mask_only"][k] for r in runs])
        sd = lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0  # noqa: E731
        print(f"{k:18s}{a.mean():>24.4f} ± {sd(a):.4f}  {b.mean():>24.4f} ± {sd(b):.4f}  "
              + " ".join(f"{d:+.4f}" for d in a - b))
    print(f"VAE reconstruction (ceiling, --a's VAE): SSIM under the mask {runs[0]['vae_reconstruction']['ssim_mean']:.4f}")
    out = {"a": args.a, "b": args.b, "seeds": args.seeds, "runs": runs}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))
    return out


if __name__ == "__main__":
    main()
