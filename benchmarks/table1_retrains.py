"""Table 1 over several independent retrains of one recipe: is the template-guided lead larger than retrain noise?

    python benchmarks/table1_retrains.py benchmarks/results/table1_sites_new_bundles.json \
        benchmarks/results/table1_sites_retrain2.json benchmarks/results/table1_sites_retrain3.json

Each JSON is one retrain of the template-guided TCDM and of its mask-only ablation, scored by
``benchmarks/table1_pairs.py`` (or ``make reproduce``'s Table 1 stages) on the same held-out pairs and seeds.
A retrain's score is the mean over its seeds. For every metric this prints each arm's mean and sd *across
retrains* (the retrain-to-retrain noise: retrains made before the case buffer kept case-id order each drew
their data order anew; now vary ``train.seed``), the mean of the per-retrain differences (template minus
mask-only) with its sd, and how many retrains favour the template (higher SSIM, lower RMSE and FID). Hand-written summary arithmetic (numpy); nothing is trained or sampled here.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

# (key, label, True when higher is better)
METRICS = (("ssim_mean", "SSIM under the mask", True), ("rmse_mean", "RMSE under the mask", False),
           ("ssim_zeroed_mean", "SSIM zeroed outside", True), ("ssim_mean_whole", "SSIM whole volume", True),
           ("rmse_mean_whole", "RMSE whole volume", False), ("fid", "FID", False),
           ("fid_patches", "sub-volume FID", False))


def retrain_scores(path: str) -> dict[str, dict[str, float]]:
    """``{"template": {metric: mean over seeds}, "mask_only": {...}}`` of one retrain's JSON."""
    try:
        runs = json.loads(Path(path).read_text())["runs"]
    except (OSError, ValueError, KeyError) as err:
        raise SystemExit(f"table1_retrains: {path}: not a table1_pairs JSON ({err})")
    if not runs or any(arm not in r for r in runs for arm in ("template", "mask_only")):
        raise SystemExit(f"table1_retrains: {path}: a run lacks the template or the mask_only arm")
    seeds = sorted(r["seed"] for r in runs)
    return {"seeds": seeds, **{arm: {k: float(np.mean([r[arm][k] for r in runs])) for k, _, _ in METRICS}
                               for arm in ("template", "mask_only")}}


def summarize(paths: list[str]) -> dict:
    retrains = [retrain_scores(p) for p in paths]
    if len({tuple(r["seeds"]) for r in retrains}) != 1:
        raise SystemExit("table1_retrains: the JSONs were scored on different seeds; compare like with like")
    out = {"retrains": paths, "seeds": retrains[0]["seeds"], "metrics": {}}
    for key, label, higher in METRICS:
        t = np.array([r["template"][key] for r in retrains])
        m = np.array([r["mask_only"][key] for r in retrains])
        d = t - m
        wins = int(np.sum(d > 0 if higher else d < 0))
        ddof = 1 if len(paths) > 1 else 0
        out["metrics"][key] = {"label": label, "template": t.tolist(), "mask_only": m.tolist(),
                               "template_mean": float(t.mean()), "template_sd": float(t.std(ddof=ddof)),
                               "mask_only_mean": float(m.mean()), "mask_only_sd": float(m.std(ddof=ddof)),
                               "diff_mean": float(d.mean()), "diff_sd": float(d.std(ddof=ddof)),
                               "template_wins": wins, "higher_is_better": higher}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jsons", nargs="+", help="one benchmarks/table1_pairs.py JSON per retrain")
    ap.add_argument("--json", default=None, help="write the summary here")
    args = ap.parse_args(argv)
    s = summarize(args.jsons)
    n = len(args.jsons)
    print(f"{n} retrains, seeds {s['seeds']}; each retrain's score is its mean over the seeds")
    print(f"{'metric':22s} {'template':>17s} {'mask-only':>17s} {'template - mask-only':>22s}  template better")
    for m in s["metrics"].values():
        print(f"{m['label']:22s} {m['template_mean']:9.4f} ± {m['template_sd']:.4f} "
              f"{m['mask_only_mean']:9.4f} ± {m['mask_only_sd']:.4f} {m['diff_mean']:+13.4f} ± {m['diff_sd']:.4f}"
              f"  {m['template_wins']}/{n}")
    if args.json:
        Path(args.json).write_text(json.dumps(s, indent=1) + "\n")
    return s


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
