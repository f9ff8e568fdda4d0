"""The paper preset builds and runs one TCDM training step on CPU at a reduced crop; prints parameter counts.

    python benchmarks/tcdm_paper_step.py [--crop 64 64 32]

Networks are MAISI-sized (configs/model/paper.yaml): MAISI's autoencoder, a 4-level 64-128-256-512
UNet and its ControlNet. The crop is reduced from the paper's 512x512x128 so that one step fits a CPU.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fcas.diffusion.conditioning import ConditionConfig, build_c_raw  # noqa: E402
from fcas.diffusion.losses import bidirectional_loss  # noqa: E402
from fcas.diffusion.schedulers import SchedulerConfig, build_train_scheduler  # noqa: E402
from fcas.labels import CONFIG_DIR  # noqa: E402
from fcas.models.networks import ModelConfig, build_tcdm, build_vae, count_parameters  # noqa: E402
from fcas.models.vae import vae_encode  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--crop", type=int, nargs=3, default=[64, 64, 32])
    args = ap.parse_args()
    crop = tuple(args.crop)
    with open(CONFIG_DIR / "model" / "paper.yaml") as fh:
        cfg = ModelConfig.from_dict(yaml.safe_load(fh))
    cond = ConditionConfig()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    vae = build_vae(cfg.vae).eval().requires_grad_(False)
    model = build_tcdm(cfg, cond.channels)
    t_build = time.perf_counter() - t0
    counts = {"vae (AutoencoderKlMaisi)": count_parameters(vae), "unet": count_parameters(model.unet),
              "controlnet": count_parameters(model.controlnet)}
    for k, v in counts.items():
        print(f"{k:26s} {v / 1e6:8.2f} M parameters")
    schema = cond.label_schema
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 1, *crop, generator=g)
    lab = torch.randint(0, schema.max_id + 1, (2, *crop), generator=g, dtype=torch.uint8)
    sched = build_train_scheduler(SchedulerConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    t0 = time.perf_counter()
    with torch.no_grad():
        z = vae_encode(vae, img)
        c_ba = build_c_raw(lab[:1], lab[1:], img[1:], schema)
        c_ab = build_c_raw(lab[1:], lab[:1], img[:1], schema)
    loss, parts = bidirectional_loss(model, sched, z[:1], z[1:], c_ba, c_ab, g)
    opt.zero_grad()
    loss.backward()
    opt.step()
    t_step = time.perf_counter() - t0
    print(f"crop {crop} -> latent {tuple(z.shape[2:])}; one bidirectional step: loss {loss.item():.4f} "
          f"({parts}), {t_step:.1f} s on CPU ({torch.get_num_threads()} threads); build {t_build:.1f} s")


if __name__ == "__main__":
    main()
