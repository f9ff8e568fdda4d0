"""How much can a template tell about the target on phantoms? Model-free oracles for Table 1's direction.

What each oracle is: :mod:`fcas.evaluation.template_oracles`. Prints the SSIM of each against the true
I_A on Table 1's held-out pairs, and writes them as JSON.

With ``--vae <TCDM checkpoint>`` it also decodes, through that checkpoint's VAE, I_A and the
``A_heart_in_mean`` paste (I_A's exact heart in the population mean): a sample decoded by that VAE from
a model that is not told A's surroundings is compared, under the mask, with the second, not the first.

Run: ``python benchmarks/template_information.py [--pairs 10] [--offset 5002] [--site-size 5]
[--vae checkpoints/demo] [--json out.json]`` (about 1 min on CPU; 2 min with sites). ``--site-size K``: the
test phantoms in sites of K consecutive seeds (as ``make reproduce`` draws Table 1's pairs), B from A's site.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fcas.evaluation.template_oracles import MASKED, population_mean, template_information  # noqa: E402


def decoded(checkpoint: str, seeds, shape=(64, 64, 64), spacing=(2.0, 2.0, 2.0), mean_seeds=range(100, 116)) -> dict:
    """SSIM under the cardiac mask of I_A's own decode and of the decoded heart-in-mean paste, against I_A."""
    import numpy as np
    import torch

    import fcas.phantom as phantom
    from fcas.diffusion.bundle import load_tcdm
    from fcas.diffusion.conditioning import hu_to_unit
    from fcas.labels import default_schema
    from fcas.metrics.image import ssim
    from fcas.models.vae import vae_decode, vae_encode

    vae = load_tcdm(checkpoint).vae.float()
    mean_img = population_mean(mean_seeds, shape, spacing)

    def decode(x):
        with torch.no_grad():
            return vae_decode(vae, vae_encode(vae, torch.as_tensor(x)[None, None])).clamp(0, 1)[0, 0].numpy()

    rows = {"vae_of_A": [], "vae_of_A_heart_in_mean": []}
    for s in seeds:
        case = phantom.make_case(int(s), shape, spacing)
        a, m = hu_to_unit(case.image).numpy(), np.isin(case.label, default_schema().cardiac_ids)
        rows["vae_of_A"].append(ssim(decode(a), a, m))
        rows["vae_of_A_heart_in_mean"].append(ssim(decode(np.where(m, a, mean_img)), a, m))
    return {k: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1))} for k, v in rows.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--offset", type=int, default=5002, help="first test seed (Table 1: real_offset + n_train)")
    ap.add_argument("--site-size", type=int, default=None, help="phantoms in sites of this many seeds (fcas.phantom.sites)")
    ap.add_argument("--vae", default=None, help="a TCDM checkpoint: also score its VAE's decodes (see above)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    if a.site_size is not None and a.site_size < 2:
        ap.error(f"--site-size must be >= 2, got {a.site_size}")
    out = template_information(range(a.offset, a.offset + a.pairs), site_size=a.site_size)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    seeds = out["seeds"]
    how = f"B from A's site, sites of {a.site_size}" if a.site_size else "(i, i+1)"
    print(f"{a.pairs} pairs {how} of phantom seeds {seeds[0]}..{seeds[-1]}; SSIM against the true I_A")
    print(f"{'oracle':<24} {'SSIM':>15}  scored over")
    for k, v in out["table"].items():
        print(f"{k:<24} {v['mean']:.3f} ± {v['sd']:.3f}  {'cardiac mask of M_A' if k in MASKED or k.endswith('_region') else 'whole volume'}")
    if a.vae:
        out["decoded"] = decoded(a.vae, seeds)
        for k, v in out["decoded"].items():
            print(f"{k:<24} {v['mean']:.3f} ± {v['sd']:.3f}  cardiac mask of M_A (decoded by {a.vae}'s VAE)")
    print(f"B's HU table moves SSIM under the mask by at most {out['hu_table_effect']:.3f}; copying B's surroundings "
          f"instead of the population mean changes whole-volume SSIM by {out['surroundings_copy_minus_mean']:+.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
