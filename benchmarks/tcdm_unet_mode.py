"""Decision: UNet trained jointly with the ControlNet vs pretrained-then-frozen (MAISI's recipe), same budget.

    python benchmarks/tcdm_unet_mode.py [--steps 120] [--pretrain 60]

Tiny preset, phantoms, random frozen VAE (a fixed deterministic encoder), one process. Both runs take
the same number of optimizer steps; 'pretrain_freeze' spends ``--pretrain`` of them on the UNet alone.
Score: the conditional denoising loss (Eq. 3, both directions) on held-out phantom pairs at fixed noise
and timesteps (lower is better), and the same loss with the condition of a *wrong* template, whose
gap measures how much the model uses the condition.
"""
import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fcas.diffusion.conditioning import build_c_raw  # noqa: E402
from fcas.diffusion.data import load_cases  # noqa: E402
from fcas.diffusion.losses import bidirectional_loss  # noqa: E402
from fcas.diffusion.schedulers import build_train_scheduler  # noqa: E402
from fcas.training.tcdm import TCDMSettings, train_tcdm_loop  # noqa: E402
from fcas.diffusion.bundle import load_tcdm  # noqa: E402
from fcas.models.checkpoint import latest_checkpoint  # noqa: E402
from fcas.models.vae import vae_encode  # noqa: E402

warnings.filterwarnings("ignore", message="TCDM uses an untrained")


@torch.no_grad()
def held_out_loss(bundle, cases, shuffle=False):
    sched = build_train_scheduler(bundle.scheduler)
    schema = bundle.condition.label_schema
    n, tot = len(cases), []
    for i in range(n):
        a, b = i, (i + 1) % n
        w = (i + 2) % n if shuffle else b  # wrong template: another case's mask/image as M_B, I_B
        z_a = vae_encode(bundle.vae, cases.images[a:a + 1], bundle.scale_factor)
        z_b = vae_encode(bundle.vae, cases.images[b:b + 1], bundle.scale_factor)
        c_ba = build_c_raw(cases.labels[a:a + 1], cases.labels[w:w + 1], cases.images[w:w + 1], schema)
        c_ab = build_c_raw(cases.labels[b:b + 1], cases.labels[a:a + 1], cases.images[a:a + 1], schema)
        for s in range(4):
            loss, _ = bidirectional_loss(bundle.model, sched, z_a, z_b, c_ba, c_ab, torch.Generator().manual_seed(s))
            tot.append(float(loss))
    return sum(tot) / len(tot)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--pretrain", type=int, default=60)
    a = ap.parse_args()
    torch.set_num_threads(1)
    shape, spacing = (32, 32, 32), (4.0, 4.0, 4.0)
    train = load_cases("phantom:8", shape, spacing)
    held = load_cases("phantom:4@5000", shape, spacing)
    rows = []
    for mode in ("joint", "pretrain_freeze"):
        out = tempfile.mkdtemp(prefix=f"unet_mode_{mode}_")
        s = TCDMSettings.from_dict({"data": "phantom:8", "out": out, "shape": shape, "spacing": spacing,
                                    "model": {"name": "tiny"}, "train": {
                                        "steps": a.steps, "unet_mode": mode, "lr": 5e-4,
                                        "pretrain_steps": a.pretrain if mode != "joint" else 0,
                                        "checkpoint_every": a.steps}})
        t0 = time.perf_counter()
        train_tcdm_loop(s, cases=train, progress=False)
        dt = time.perf_counter() - t0
        bundle = load_tcdm(latest_checkpoint(out))
        rows.append((mode, held_out_loss(bundle, held), held_out_loss(bundle, held, shuffle=True), dt))
    print(f"{'unet_mode':16s} {'held-out loss':>14s} {'wrong-template loss':>20s} {'train s':>8s}")
    for mode, l, lw, dt in rows:
        print(f"{mode:16s} {l:14.4f} {lw:20.4f} {dt:8.1f}")
    print(f"ratio pretrain_freeze/joint held-out loss: {rows[1][1] / rows[0][1]:.3f} "
          f"({a.steps} steps each, pretrain {a.pretrain})")


if __name__ == "__main__":
    main()
