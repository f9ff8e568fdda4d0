"""Per-worker peak RSS of TCDM and VAE training with 8 vs 64 cases: streamed (new) vs in memory (old).

    python benchmarks/training_memory.py [--small 8] [--large 64] [--steps 3] [--grid 32] [--workers 1] \
        [--json benchmarks/results/training_memory.json]

Each figure is one fresh driver process that starts a local Ray and runs a ``TorchTrainer`` at the tiny
preset on ``data=phantom:N`` (the cases are generated where they are loaded); the train worker reads its
own peak RSS (``ru_maxrss``) after the loop and writes it to a file, so the figure is the worker's, not
the driver's.

* **new**: the job's path -- Ray Data streams the cases (:func:`fcas.pipeline.train_tcdm.cases_dataset`)
  into a buffer of ``train.buffer_cases`` (8) per worker;
* **old**: the in-memory path -- the worker loads all N cases (``train_*_loop`` without a stream).

``--grid`` enlarges the cases (the tiny networks still train on a 32^3 crop) so that the data is
visible next to the ~0.5 GB a worker holds for torch and Ray. The acceptance is new(large) / new(small)
<= 1.2 per model.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _worker(config: dict) -> None:
    """Train worker: the job's loop (streamed or in memory), then this process's peak RSS to a file."""
    import resource

    import ray.train

    from fcas.pipeline.train_tcdm import shard_cases, worker_hooks

    rank, world, device, wrap, report = worker_hooks()
    stream = shard_cases if config["mode"] == "new" else None
    if config["model"] == "tcdm":
        from fcas.training.tcdm import TCDMSettings, train_tcdm_loop

        train_tcdm_loop(TCDMSettings.from_dict(config["settings"]), rank=rank, world_size=world, device=device,
                        wrap_model=wrap, report=report, progress=False, case_stream=stream)
    else:
        from fcas.training.vae import VAESettings, train_vae_loop

        train_vae_loop(VAESettings.from_dict(config["settings"]), rank=rank, world_size=world, device=device,
                       wrap_model=wrap, report=report, progress=False, case_stream=stream)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(config["rss_dir"], f"rank{ray.train.get_context().get_world_rank()}.json").write_text(
        json.dumps({"peak_rss_mb": rss}))


def child(model: str, n: int, mode: str, steps: int, grid: int, workers: int, tmp: str) -> dict:
    import warnings

    import ray

    from fcas.diffusion.data import case_rows
    from fcas.labels import read_config
    from fcas.pipeline.train_tcdm import buffer_size, cases_dataset, fit

    warnings.simplefilter("ignore")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    arch = dict(read_config("model", "tiny", "model config"))
    data, shape, spacing = f"phantom:{n}", [grid] * 3, [4.0 * 32 / grid] * 3
    common = {"data": data, "out": os.path.join(tmp, "out"), "shape": shape, "spacing": spacing, "preset": "tiny"}
    train = {"steps": steps, "checkpoint_every": steps, "crop": [32, 32, 32], "scale_factor_cases": 2,
             "buffer_cases": buffer_size(8, n, workers, 2)}
    if model == "tcdm":
        from fcas.training.tcdm import TCDMSettings

        arch.pop("name", None)
        settings = TCDMSettings.from_dict({**common, "model": arch, "train": {**train, "batch_pairs": 1}})
    else:
        from fcas.training.vae import VAESettings

        settings = VAESettings.from_dict({**common, "model_name": "tiny", "vae": arch["vae"],
                                          "train": {**train, "batch_size": 1}})
    ds = cases_dataset(case_rows(data), shape, spacing, 0.25, seed=0) if mode == "new" else None
    rss_dir = os.path.join(tmp, "rss")
    os.makedirs(rss_dir)
    fit(_worker, {"settings": settings.to_dict(), "mode": mode, "model": model, "rss_dir": rss_dir},
        name=f"mem-{model}-{mode}-{n}", num_workers=workers, storage_path=os.path.join(tmp, "ray"),
        cpus_per_worker=0.5, datasets={"train": ds} if ds is not None else None)
    ranks = [json.loads(p.read_text())["peak_rss_mb"] for p in sorted(Path(rss_dir).glob("rank*.json"))]
    ray.shutdown()
    return {"model": model, "mode": mode, "n": n, "grid": grid, "steps": steps, "workers": workers,
            "peak_rss_mb": max(ranks), "per_rank_mb": ranks}


def measure(model: str, n: int, mode: str, a) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", model, str(n), mode, "--steps", str(a.steps),
               "--grid", str(a.grid), "--workers", str(a.workers), "--tmp", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"training_memory: {model} {mode} n={n} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {model} {mode} n={n}: worker peak RSS {row['peak_rss_mb']:.0f} MB", file=sys.stderr)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=8)
    ap.add_argument("--large", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--grid", type=int, default=32, help="case grid (voxels per axis, a multiple of 32)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--models", default="tcdm,vae")
    ap.add_argument("--no-old", action="store_true", help="skip the in-memory path")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "N", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]), a.child[2], a.steps, a.grid, a.workers, a.tmp)))
        return
    modes = ("new",) if a.no_old else ("new", "old")
    rows = [measure(m, n, mode, a) for m in a.models.split(",") for mode in modes for n in (a.small, a.large)]
    rss = {(r["model"], r["mode"], r["n"]): r["peak_rss_mb"] for r in rows}
    ratios = {f"{m}_{mode}": rss[m, mode, a.large] / rss[m, mode, a.small]
              for m in a.models.split(",") for mode in modes}
    print(f"| model | path | n={a.small} (MB) | n={a.large} (MB) | ratio |\n|---|---|---|---|---|")
    for key, ratio in ratios.items():
        m, mode = key.split("_")
        print(f"| {m} | {mode} | {rss[m, mode, a.small]:.0f} | {rss[m, mode, a.large]:.0f} | {ratio:.3f} |")
    ok = all(r <= 1.2 for k, r in ratios.items() if k.endswith("_new"))
    print(f"grid {a.grid}^3, {a.steps} steps, {a.workers} worker(s); "
          f"acceptance new ratio <= 1.2: {'pass' if ok else 'FAIL'}")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "ratios": ratios, "acceptance_pass": ok}, indent=1) + "\n")


if __name__ == "__main__":
    main()
