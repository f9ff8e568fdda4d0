"""TCDM training step under each memory / speed lever: step time and peak memory, side by side in one run.

The levers are the ``train.*`` keys of ``configs/train_tcdm.yaml``: ``amp`` with ``amp_dtype`` float16 or
bfloat16, ``activation_checkpointing``, ``channels_last``, ``fused_attention``. One step = the bidirectional
loss (both directions in one forward) of ``--pairs`` pairs of latent crops with their full-resolution
conditions, backward, AdamW step -- what ``train_tcdm_loop`` does per step with the latent cache (no VAE).
Inputs are random tensors of the right shapes: a convolution's cost does not depend on the values.

Method (the earlier GPU figure of "bf16 slower than fp32" had none of this): ``cudnn.benchmark`` on, two
warm-up steps per lever, ``torch.cuda.synchronize()`` around every timed step, levers interleaved round by
round (so drift hits all alike), the median of the rounds; peak memory = ``torch.cuda.max_memory_allocated``
of a lever's rounds; norms stay fp32 (autocast's own lists). On CPU (no GPU here) autocast and fused
attention are no-ops and memory is not measured, so only the mechanics and the CPU-side levers are shown.

    python benchmarks/training_levers.py                       # CUDA: paper preset, 512x512x128 crop
    python benchmarks/training_levers.py --preset demo --model demo --rounds 2    # CPU, minutes
    python benchmarks/training_levers.py --json benchmarks/results/training_levers_<gpu>.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fcas.config_files import read_config  # noqa: E402
from fcas.diffusion.conditioning import ConditionConfig  # noqa: E402
from fcas.diffusion.losses import bidirectional_loss  # noqa: E402
from fcas.diffusion.schedulers import SchedulerConfig, build_train_scheduler  # noqa: E402
from fcas.models.networks import ModelConfig, build_tcdm, set_activation_checkpointing, set_flash_attention  # noqa: E402
from fcas.presets import load_preset  # noqa: E402
from fcas.training.loop import amp_context, grad_scaler  # noqa: E402

LEVERS = {
    "fp32": {},
    "amp_fp16": {"amp": True, "amp_dtype": "float16"},
    "amp_bf16": {"amp": True, "amp_dtype": "bfloat16"},
    "checkpointing": {"activation_checkpointing": True},
    "channels_last": {"channels_last": True},
    "fused_attention": {"fused_attention": True},
    "bf16+checkpointing+fused": {"amp": True, "amp_dtype": "bfloat16", "activation_checkpointing": True,
                                 "fused_attention": True},
}


class Lever:
    def __init__(self, name: str, cfg: ModelConfig, channels: int, device: torch.device, **opts):
        self.name, self.device, self.opts = name, device, opts
        torch.manual_seed(0)
        self.model = build_tcdm(cfg, channels).to(device)
        set_activation_checkpointing(self.model, opts.get("activation_checkpointing", False))
        if opts.get("fused_attention") and device.type == "cuda":
            set_flash_attention(self.model, True)
        self.layout = torch.channels_last_3d if opts.get("channels_last") else torch.contiguous_format
        self.model.to(memory_format=self.layout)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.scaler = grad_scaler(device, opts.get("amp", False), opts.get("amp_dtype", "float16"))
        self.times: list[float] = []
        self.peak_gib = None

    def step(self, batch, scheduler) -> float:
        z_a, z_b, c_ba, c_ab = (t.to(memory_format=self.layout) for t in batch)
        gen = torch.Generator(device=self.device).manual_seed(0)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with amp_context(self.device, self.opts.get("amp", False), self.opts.get("amp_dtype", "float16")):
            loss, _ = bidirectional_loss(self.model, scheduler, z_a, z_b, c_ba, c_ab, gen)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss.float()).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def release(self):
        self.model, self.opt = None, None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    ap.add_argument("--preset", default="paper" if cuda else "demo")
    ap.add_argument("--model", default="paper" if cuda else "demo")
    ap.add_argument("--crop", type=int, nargs=3, default=None, help="image crop (default: the preset's train_crop)")
    ap.add_argument("--pairs", type=int, default=1, help="pairs per step (x2 directions)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--levers", nargs="*", default=list(LEVERS), choices=list(LEVERS))
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cudnn.benchmark = True
    preset = load_preset(a.preset)
    crop = tuple(a.crop or preset.train_crop or preset.shape)
    down = [s // l for s, l in zip(preset.shape, preset.latent_shape)]
    cfg = ModelConfig.from_dict(dict(read_config("model", a.model, "model config")))
    cond = ConditionConfig()
    g = torch.Generator().manual_seed(0)
    n = a.pairs
    lat = (n, cfg.vae.latent_channels, *(c // d for c, d in zip(crop, down)))
    batch = tuple(t.to(device) for t in (torch.randn(lat, generator=g), torch.randn(lat, generator=g),
                                         torch.rand((n, cond.channels, *crop), generator=g),
                                         torch.rand((n, cond.channels, *crop), generator=g)))
    scheduler = build_train_scheduler(SchedulerConfig())
    results = {}
    # one lever's networks at a time on the GPU (two paper-size models need not fit together): warm up and
    # time each in turn, round-robin over the levers for the timed rounds
    for r in range(a.rounds + 1):
        for name in a.levers:
            lever = Lever(name, cfg, cond.channels, device, **LEVERS[name])
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                if r == 0:
                    lever.step(batch, scheduler)   # warm-up (cudnn.benchmark picks algorithms here)
                    lever.step(batch, scheduler)
                    continue
                dt = lever.step(batch, scheduler)
                res = results.setdefault(name, {"times_s": [], "peak_gib": 0.0})
                res["times_s"].append(round(dt, 4))
                if device.type == "cuda":
                    res["peak_gib"] = max(res["peak_gib"], torch.cuda.max_memory_allocated() / 1024 ** 3)
            except torch.cuda.OutOfMemoryError:
                results[name] = {"times_s": [], "peak_gib": None, "error": "out of memory"}
            finally:
                lever.release()
    base = statistics.median(results["fp32"]["times_s"]) if results.get("fp32", {}).get("times_s") else None
    print(f"TCDM training step, {a.model} networks, crop {crop} (latent {lat[2:]}), {n} pair(s) x 2 directions, "
          f"{device}{' ' + torch.cuda.get_device_name() if cuda else ''}, median of {a.rounds} interleaved rounds")
    print(f"{'lever':<26} {'step s':>8} {'vs fp32':>8} {'peak GiB':>9}")
    for name, res in results.items():
        med = statistics.median(res["times_s"]) if res["times_s"] else float("nan")
        res["median_s"] = med
        ratio = med / base if base else float("nan")
        peak = "-" if not res.get("peak_gib") else f"{res['peak_gib']:.1f}"
        print(f"{name:<26} {med:>8.3f} {ratio:>8.2f} {peak:>9} {res.get('error', '')}")
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "preset": a.preset, "model": a.model, "crop": list(crop),
           "pairs": n, "rounds": a.rounds, "levers": results,
           "memory": "torch.cuda.max_memory_allocated" if cuda else "not measured on CPU"}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
