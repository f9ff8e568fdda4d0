"""TCDM training steps/s from a latent cache (``train.latent_cache``) vs encoding with the frozen VAE on the fly.

    python benchmarks/latent_cache.py [--steps 12] [--rounds 3] [--data phantom:8] [--vae checkpoints/demo] \
        [--preset demo] [--model demo] [--threads 1] [--json benchmarks/results/latent_cache_demo_cpu2.json]

One process. The cache is built first by the job itself (:func:`fcas.pipeline.cache_latents.run_cache_latents`,
local Ray, one encoder actor; its time is reported apart, a one-off cost). Then both paths run the job's
streamed loop (:func:`fcas.training.tcdm.train_tcdm_loop` with ``case_stream=``, a buffer of
``train.buffer_cases`` cases, one slot refilled per step), interleaved: ``--rounds`` rounds of ``--steps``
steps each, the order of the two paths alternating, so that the load of a shared machine falls on both.

* **on the fly**: the stream hands over cases already in memory (as Ray Data's loading tasks prefetch
  them in the job; the phantom generation is not counted), and the loop encodes the refilled case
  with the VAE every step (at the demo preset there is no training crop: whole volumes);
* **cache**: the stream reads each case from its shard (:func:`fcas.diffusion.latent_cache.load_cached_batch`,
  counted inside the step), and the loop encodes nothing.

A step's time is the loop's own ``step_time_s`` (refill, encode, forward/backward, optimizer; not the
checkpoint write); the first step of each round is left out (warm-up). Both streams deliver the cases in
the same order, so the two paths see the same pairs and noise and their losses must agree.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fcas.diffusion.data import case_rows, load_cases  # noqa: E402
from fcas.diffusion.latent_cache import check_latent_cache, load_cached_batch  # noqa: E402
from fcas.training.tcdm import TCDMSettings, train_tcdm_loop  # noqa: E402
from fcas.labels import read_config  # noqa: E402
from fcas.models.bundle import vae_digest  # noqa: E402
from fcas.presets import load_preset  # noqa: E402

MODES = ("on_the_fly", "cache")


def _stream(n: int, get, seed: int = 0):
    """Cases ``get(i)`` forever, in a fresh permutation of ``range(n)`` every epoch (the same for both paths)."""
    epoch = 0
    while True:
        for i in np.random.default_rng([seed, epoch]).permutation(n):
            yield get(int(i))
        epoch += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="steps per round and path")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data", default="phantom:8")
    ap.add_argument("--vae", default="checkpoints/demo")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--buffer", type=int, default=8, help="train.buffer_cases")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the loop (the job's worker: 1)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(a.threads)
    preset = load_preset(a.preset)
    arch = dict(read_config("model", a.model, "model config"))
    arch.pop("name", None)
    tmp = tempfile.mkdtemp(prefix="latent_cache_bench.")
    load_before = os.getloadavg()

    # ---- the cache, built by the job (local Ray, one encoder actor) ----
    import ray

    from fcas.models.networks import ModelConfig
    from fcas.pipeline.cache_latents import CacheJob, CacheResources, run_cache_latents

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    cache_dir = os.path.join(tmp, "cache")
    built = run_cache_latents(CacheJob(data=a.data, out=cache_dir, shape=preset.shape, spacing=preset.spacing,
                                       vae=a.vae, vae_config=ModelConfig.from_dict(arch).vae,
                                       resources=CacheResources(cpus_per_actor=1)), progress=False)
    ray.shutdown()
    print(f"cache: {built['cases']} cases in {built['shards']} shards, {built['seconds']} s (with Ray start)")

    # ---- the two streams ----
    ids = [r["case_id"] for r in case_rows(a.data, "train")]
    rows = check_latent_cache(cache_dir, vae_digest(a.vae), ids, preset.shape, preset.spacing)
    cases = load_cases(a.data, preset.shape, preset.spacing)   # on the fly: delivered from memory

    def fly(i: int) -> dict:
        return {"case_id": cases.case_ids[i], "image": cases.images[i].numpy(), "label": cases.labels[i].numpy()}

    def cached(i: int) -> dict:
        b = load_cached_batch({"case_id": [rows[i]["case_id"]], "uri": [rows[i]["uri"]]})
        return {k: v[0] for k, v in b.items()}

    streams = {"on_the_fly": fly, "cache": cached}
    times: dict[str, list[float]] = {m: [] for m in MODES}
    rounds = []
    for r in range(a.rounds):
        order = MODES if r % 2 == 0 else MODES[::-1]
        losses = {}
        for mode in order:
            seen: list[dict] = []
            train = {"steps": a.steps, "checkpoint_every": a.steps, "keep_checkpoints": 1, "buffer_cases": a.buffer,
                     **({"latent_cache": cache_dir} if mode == "cache" else {})}
            settings = TCDMSettings.from_dict({"data": a.data, "out": os.path.join(tmp, f"{mode}-{r}"),
                                               "shape": preset.shape, "spacing": preset.spacing, "preset": a.preset,
                                               "vae": a.vae, "model": arch, "train": train})
            get = streams[mode]
            t0 = time.perf_counter()
            train_tcdm_loop(settings, progress=False, case_stream=lambda: _stream(len(ids), get),
                            report=lambda m, checkpoint_uri=None, checkpoint_step=False: seen.append(m))
            wall = time.perf_counter() - t0
            dts = [m["step_time_s"] for m in seen][1:]   # the first step of a round: warm-up
            times[mode] += dts
            losses[mode] = [m["loss"] for m in seen]
            rounds.append({"round": r, "mode": mode, "steps_per_s": round(len(dts) / sum(dts), 4),
                           "median_step_s": round(float(np.median(dts)), 4), "wall_s_with_setup": round(wall, 2)})
            print(f"round {r} {mode:>10}: {len(dts) / sum(dts):.3f} steps/s (median step {np.median(dts):.3f} s)")
        diff = float(np.max(np.abs(np.subtract(losses["on_the_fly"], losses["cache"]))))
        rounds[-1]["loss_max_abs_diff"] = rounds[-2]["loss_max_abs_diff"] = diff
    sps = {m: len(times[m]) / sum(times[m]) for m in MODES}
    result = {
        "preset": a.preset, "model": a.model, "vae": a.vae, "data": a.data, "buffer_cases": a.buffer,
        "steps_per_round": a.steps, "rounds": a.rounds, "torch_threads": a.threads,
        "steps_per_s": {m: round(v, 4) for m, v in sps.items()},
        "median_step_s": {m: round(float(np.median(times[m])), 4) for m in MODES},
        "ratio_cache_over_on_the_fly": round(sps["cache"] / sps["on_the_fly"], 3),
        "loss_max_abs_diff": max(x["loss_max_abs_diff"] for x in rounds),
        "cache_build": {k: built[k] for k in ("cases", "shards", "seconds", "cases_per_s")},
        "per_round": rounds,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "load_avg_before": [round(x, 2) for x in load_before], "load_avg_after": [round(x, 2) for x in os.getloadavg()],
    }
    print(f"on the fly {sps['on_the_fly']:.3f} steps/s, cache {sps['cache']:.3f} steps/s: "
          f"ratio {result['ratio_cache_over_on_the_fly']}x (loss max |diff| {result['loss_max_abs_diff']:.2e})")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
