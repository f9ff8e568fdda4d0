"""Sampling cost at a preset: condition embedding cached once vs recomputed every step, and decode cost.

    python benchmarks/tcdm_sampling.py [--ckpt checkpoints/demo | --model demo] [--steps 20] [--repeats 2]

Both variants run in this process on the same inputs and seeds (their outputs are bit-identical,
tests/test_diffusion.py checks it); the ratio is what caching E_ctrl(c_raw) saves.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fcas.diffusion.conditioning import ConditionConfig, build_c_raw  # noqa: E402
from fcas.diffusion.sampling import decode_latent, sample  # noqa: E402
from fcas.labels import CONFIG_DIR  # noqa: E402
from fcas.models.networks import ModelConfig, build_tcdm, build_vae  # noqa: E402
from fcas.presets import load_preset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    if a.ckpt:
        from fcas.diffusion.bundle import load_tcdm

        bundle = load_tcdm(a.ckpt)
        model, vae, sf, shape, cond = bundle.model, bundle.vae, bundle.scale_factor, bundle.shape, bundle.condition
    else:
        with open(CONFIG_DIR / "model" / f"{a.model}.yaml") as fh:
            cfg = ModelConfig.from_dict(yaml.safe_load(fh))
        cond = ConditionConfig()
        model, vae, sf = build_tcdm(cfg, cond.channels).eval(), build_vae(cfg.vae).eval(), 1.0
        shape = load_preset(a.model).shape
    g = torch.Generator().manual_seed(0)
    schema = cond.label_schema
    lab = torch.randint(0, schema.max_id + 1, (2, *shape), generator=g, dtype=torch.uint8)
    c = build_c_raw(lab[:1], lab[1:], torch.rand(1, 1, *shape, generator=g), schema, cond.encoding, cond.mask_only)
    times = {}
    for cached in (True, False, True, False)[: 2 * a.repeats]:
        t0 = time.perf_counter()
        sample(model, c, torch.Generator().manual_seed(1), steps=a.steps, cache_condition=cached)
        times.setdefault(cached, []).append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    with torch.no_grad():
        decode_latent(vae, torch.randn(1, 4, *(s // 4 for s in shape)), sf)
    t_dec = time.perf_counter() - t0
    tc, tu = min(times[True]), min(times[False])
    print(f"grid {tuple(shape)}, {a.steps} DDIM steps, {torch.get_num_threads()} threads")
    print(f"  condition embedded once : {tc:7.2f} s  ({tc / a.steps * 1000:.0f} ms/step)")
    print(f"  embedded every step     : {tu:7.2f} s  ({tu / a.steps * 1000:.0f} ms/step)")
    print(f"  speed-up from caching   : {tu / tc:.2f}x")
    print(f"  one VAE decode          : {t_dec:7.2f} s")


if __name__ == "__main__":
    main()
