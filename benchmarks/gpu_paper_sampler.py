"""Paper-preset synthesis and training costs on one GPU, measured side by side in one run.

    python benchmarks/gpu_paper_sampler.py [--steps 4] [--json out.json]

Networks are the paper preset's (configs/model/paper.yaml: MAISI-sized autoencoder, UNet and ControlNet),
randomly initialised: the cost of a convolution does not depend on its weights. Everything runs through
the functions the sampler actor calls (``sample``, ``decode_latent``, ``ssv_confidence``) and the TCDM
training loss (``bidirectional_loss``). Measured, each after a warm-up:

1. one denoiser step (UNet + ControlNet) on one latent window, explicit vs fused attention, fp32 vs bf16
   autocast (the ratio table the sampler's defaults come from);
2. a whole paper sample's reverse steps (latent 128x128x64 with the preset's sliding windows, and whole);
3. the VAE decode of the whole 512x512x256 volume in 32^3 and 64^3 latent windows (and at once, opt-in);
4. SSV latent mode on 5 intermediates;
5. one bidirectional TCDM training step on the paper's 512x512x128 crop.

Prints a table and writes JSON (``--json``) with the planner's figures: seconds per denoiser step per
latent megavoxel, decode seconds per output megavoxel, SSV seconds per output megavoxel. A step that runs
out of memory is recorded as such and the run goes on.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fcas.diffusion.conditioning import ConditionConfig, build_c_raw  # noqa: E402
from fcas.diffusion.losses import bidirectional_loss  # noqa: E402
from fcas.diffusion.sampling import decode_latent, sample  # noqa: E402
from fcas.diffusion.schedulers import SchedulerConfig, build_train_scheduler  # noqa: E402
from fcas.diffusion.ssv import ssv_confidence  # noqa: E402
from fcas.labels import CONFIG_DIR  # noqa: E402
from fcas.models.networks import ModelConfig, build_tcdm, build_vae, count_parameters, set_flash_attention  # noqa: E402

RESULTS: dict = {}
DTYPES = {"cuda": ("fp32", "bf16"), "cpu": ("fp32",)}   # bf16 convolutions on CPU are ~15x slower than fp32


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(name: str, fn, reps: int = 1, warmup: int = 1) -> float | None:
    """Mean seconds of ``fn()`` over ``reps`` after ``warmup`` calls; None (and 'oom') when out of memory."""
    try:
        for _ in range(warmup):
            fn()
        sync()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        s = (time.perf_counter() - t0) / reps
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        RESULTS[name] = {"s": round(s, 4), "peak_gib": round(peak, 2)}
        print(f"{name:58s} {s:9.3f} s   peak {peak:6.1f} GiB", flush=True)
        return s
    except torch.OutOfMemoryError:
        RESULTS[name] = {"s": None, "error": "out of memory"}
        print(f"{name:58s}   out of memory", flush=True)
        return None
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def autocast(dtype: str):
    if dtype == "bf16":
        return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)
    return nullcontext()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="reverse steps timed per whole sample")
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 512, 256], help="output grid (paper preset)")
    ap.add_argument("--crop", type=int, nargs=3, default=[512, 512, 128], help="training crop (paper preset)")
    ap.add_argument("--window", type=int, nargs=3, default=[64, 64, 128], help="latent sliding window")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--whole-decode", action="store_true", help="also decode the whole volume at once (slow)")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    with open(CONFIG_DIR / "model" / "paper.yaml") as fh:
        cfg = ModelConfig.from_dict(yaml.safe_load(fh))
    cond = ConditionConfig()
    torch.manual_seed(0)
    vae = build_vae(cfg.vae).eval().requires_grad_(False).to(dev)
    model = build_tcdm(cfg, cond.channels).to(dev)
    RESULTS["env"] = {
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "parameters_m": {"vae": count_parameters(vae) / 1e6, "unet": count_parameters(model.unet) / 1e6,
                         "controlnet": count_parameters(model.controlnet) / 1e6},
        "shape": args.shape, "crop": args.crop, "window": args.window, "steps_timed": args.steps,
    }
    print(json.dumps(RESULTS["env"]), flush=True)
    schema = cond.label_schema
    g = torch.Generator().manual_seed(0)
    shape = tuple(args.shape)
    lat = tuple(s // 4 for s in shape)
    lab = torch.randint(0, schema.max_id + 1, (2, *shape), generator=g, dtype=torch.uint8)
    img = torch.rand(1, 1, *shape, generator=g)
    c_raw = build_c_raw(lab[:1].long(), lab[1:].long(), img, schema).to(dev)
    del img
    window = tuple(min(w, s) for w, s in zip(args.window, lat))
    t = torch.tensor([500], device=dev)

    # 1. one denoiser step on one window: attention path x precision
    model.eval()
    z_w = torch.randn(1, 4, *window, device=dev)
    with torch.no_grad():
        emb_w = model.embed_condition(c_raw[..., : 4 * window[0], : 4 * window[1], : 4 * window[2]])
    lat_mvox_w = z_w[0, 0].numel() / 1e6
    step = {}
    for flash in (False, True):
        set_flash_attention(model, flash)
        for dtype in DTYPES[dev.type]:
            def one():
                with torch.no_grad(), autocast(dtype):
                    model(z_w, t, cond_embedding=emb_w)
            key = f"{'fused' if flash else 'explicit'}-{dtype}"
            step[key] = timed(f"1. denoiser step, window {window}, {key}", one, reps=3)
    best = min((k for k in step if step[k]), key=lambda k: step[k])
    RESULTS["denoiser_best"] = best
    set_flash_attention(model, best.startswith("fused"))
    best_dtype = best.split("-")[1]
    print(f"   best: {best}; explicit-fp32 / best = {step['explicit-fp32'] / step[best]:.2f}x" if step.get("explicit-fp32")
          else f"   best: {best}", flush=True)

    # 2. a whole sample's reverse steps (the sampler actor's call), windowed and whole
    gen = torch.Generator().manual_seed(1)
    out = {}
    for label, win in (("windowed", window), ("whole", None)):
        def rev():
            with autocast(best_dtype):
                out["res"] = sample(model, c_raw, gen, args.steps, "ddim", collect_every=2, window=win,
                                    scheduler_config=SchedulerConfig())
        s = timed(f"2. {args.steps} DDIM steps, latent {lat}, {label}, {best}", rev, reps=1)
        if s:
            RESULTS[f"dm_s_per_step_{label}"] = s / args.steps
            RESULTS[f"dm_s_per_step_per_latent_mvox_{label}"] = s / args.steps / (torch.Size(lat).numel() / 1e6)
    res = out.get("res")
    latent = res.latent.float() if res is not None else torch.randn(1, 4, *lat, device=dev)
    inter = [x.float() for x in (res.intermediates if res is not None else [latent])]
    inter = (inter * 5)[:5]   # the paper's 20 steps / every 4th = 5 intermediates, whatever --steps timed

    # 3. VAE decode of the whole volume: in latent windows (the paper preset's decode_window is 32^3), and
    # at once only with --whole-decode (on one H200 it had not finished after 150 s; 32^3 windows: 5.0 s)
    out_mvox = torch.Size(shape).numel() / 1e6
    decode_s = {}
    for win in [(32, 32, 32), (64, 64, 64)] + ([None] if args.whole_decode else []):
        def dec():
            out["img"] = decode_latent(vae, latent, 1.0, window=win)
        decode_s[win] = timed(f"3. VAE decode {shape}, {'whole' if win is None else f'latent windows {win}'}, fp32", dec)
    if decode_s.get((32, 32, 32)):
        RESULTS["decode_s_per_mvox"] = decode_s[(32, 32, 32)] / out_mvox

    # 4. SSV latent mode
    def ssv():
        out["cm"] = ssv_confidence(inter, "latent", out_shape=shape)
    s = timed(f"4. SSV latent mode, {len(inter)} intermediates -> {shape}", ssv, reps=3)
    if s:
        RESULTS["ssv_latent_s_per_mvox"] = s / out_mvox

    # 5. one bidirectional training step on the paper crop
    if not args.skip_train:
        del c_raw, emb_w, out
        torch.cuda.empty_cache() if dev.type == "cuda" else None
        crop = tuple(args.crop)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        sched = build_train_scheduler(SchedulerConfig())
        z = torch.randn(2, 4, *(c // 4 for c in crop), device=dev)
        labc = lab[:, : crop[0], : crop[1], : crop[2]].long()
        imgc = torch.rand(2, 1, *crop, generator=g)
        c_ba = build_c_raw(labc[:1], labc[1:], imgc[1:], schema).to(dev)
        c_ab = build_c_raw(labc[1:], labc[:1], imgc[:1], schema).to(dev)
        for dtype in DTYPES[dev.type]:
            def train_step():
                with autocast(dtype):
                    loss, _ = bidirectional_loss(model, sched, z[:1], z[1:], c_ba, c_ab, torch.Generator().manual_seed(0))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            s = timed(f"5. TCDM bidirectional train step, crop {crop}, {best.split('-')[0]}-{dtype}", train_step, reps=2)
            if s:
                RESULTS[f"train_s_per_step_{dtype}"] = s
    print(json.dumps(RESULTS, indent=1), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(RESULTS, indent=1) + "\n")


if __name__ == "__main__":
    main()
