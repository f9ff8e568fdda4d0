"""Synthesis job throughput, memory and SSV cost, measured side by side in one run.

    python benchmarks/synthesize.py [--preset demo] [--n 8] [--rss 20 200] [--json benchmarks/results/synthesize_demo.json]

1. Pipeline vs slowest stage: the Ray Data job (local Ray) on ``n`` samples, steady-state rate
   (after the first sample reached the driver, so Ray start-up and model loads are excluded), then
   each stage alone in this process on the same sample ids with one torch thread (what a
   fractional-CPU Ray actor gets). Goal: pipeline / slowest stage >= 0.9.
2. SSV overhead: the sampler stage on the same inputs with ``ssv.mode`` off, latent and image at
   equal steps. Goal: latent <= 10 %.
3. Condition cache: reverse sampling with the ControlNet condition embedded once per sample vs
   at every step (same seeds, bit-identical outputs).
4. Driver memory: ``jobs/synthesize.py`` at the tiny preset in a fresh process for each n in
   ``--rss`` (a 2-step checkpoint trained here); the driver's peak RSS must not grow with n.

Everything printed is also written as JSON (``--json``), which ``configs/hardware/`` cites.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fcas.diffusion.conditioning import build_c_raw, hu_to_unit  # noqa: E402
from fcas.diffusion.sampling import sample  # noqa: E402
from fcas.io.nifti import read_nifti  # noqa: E402
from fcas.presets import load_preset  # noqa: E402


def _stack(rows: list[dict]) -> dict:
    return {k: np.asarray([r[k] for r in rows], dtype=object if isinstance(rows[0][k], str) else None)
            for k in rows[0]}


def _rows(batch: dict, i: int) -> dict:
    return {k: v[i] for k, v in batch.items()}


def pipeline_vs_stages(preset: str, n: int, steps: int, every: int, workdir: Path) -> dict:
    import ray

    from fcas.deform.stage import MGMStage
    from fcas.pipeline.synthesize import Resources, SynthesisJob, plan_batch, run_synthesis, template_library
    from fcas.synthesis.sampler import SamplerSettings, SamplerStage
    from fcas.synthesis.writer import WriterStage

    p = load_preset(preset)
    settings = SamplerSettings(steps=steps, ssv_every=every)

    def job(n_: int, name: str) -> SynthesisJob:
        return SynthesisJob(n=n_, out=str(workdir / name), checkpoint=str(ROOT / "checkpoints" / preset),
                            shape=p.shape, spacing=p.spacing, sampler=settings,
                            resources=Resources(writer_batch_size=1), config_hash="bench")

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    # two runs that differ only in n: their time difference is what n more samples cost in the
    # pipeline, with start-up (templates, actors, model loads) the same in both and cancelled out
    small = run_synthesis(job(2, "pipeline-small"), progress=False)
    summary = run_synthesis(job(2 + n, "pipeline"), progress=False)
    marginal = n / (summary["seconds"] - small["seconds"])
    library = template_library(job(n, "pipeline"))
    ray.shutdown()

    # the same ids, each stage alone, one thread (a fractional-CPU actor runs with OMP_NUM_THREADS=1)
    torch.set_num_threads(1)
    ids = {"id": np.arange(2, 2 + n)}
    t0 = time.perf_counter()
    planned = plan_batch(ids, library, run_seed=0)
    t_plan = time.perf_counter() - t0
    mgm = MGMStage(None, "cardiac")
    mgm.template(str(planned["template_uri"][0]))          # warm the template cache as an actor would
    t0 = time.perf_counter()
    mgm_rows = [_rows(mgm(_stack([_rows(planned, i)])), 0) for i in range(n)]
    t_mgm = time.perf_counter() - t0
    sampler = SamplerStage(str(ROOT / "checkpoints" / preset), settings)
    t0 = time.perf_counter()
    sampled = [_rows(sampler(_stack([r])), 0) for r in mgm_rows]
    t_sampler = time.perf_counter() - t0
    writer = WriterStage(str(workdir / "writer_alone"), settings.to_json(), "bench", True)
    t0 = time.perf_counter()
    for r in sampled:
        writer(_stack([r]))
    t_writer = time.perf_counter() - t0
    alone = {"plan": n / t_plan, "mgm": n / t_mgm, "sampler": n / t_sampler, "writer": n / t_writer}
    slowest = min(alone, key=alone.get)
    return {
        "preset": preset, "n": n, "steps": steps, "ssv_every": every,
        "pipeline_seconds": {"n=2": small["seconds"], f"n={2 + n}": summary["seconds"]},
        "pipeline_startup_s": round(small["seconds"] - 2 / marginal, 2),
        "pipeline_marginal_samples_per_s": round(marginal, 4),
        "pipeline_end_to_end_samples_per_s": summary["samples_per_s"],
        "stage_alone_samples_per_s": {k: round(v, 4) for k, v in alone.items()},
        "stage_alone_seconds_per_sample": {k: round(1 / v, 4) for k, v in alone.items()},
        "slowest_stage": slowest,
        "pipeline_over_slowest_stage": round(marginal / alone[slowest], 3),
        "sampler_split_seconds": {k: round(float(np.mean([r[k] for r in sampled])), 4)
                                  for k in ("sample_s", "decode_s", "ssv_s")},
        "mgm_split_seconds": {k: round(float(np.mean([r[k] for r in mgm_rows])), 4)
                              for k in ("mgm_deform_s", "mgm_qc_s")},
        "output_bytes_per_sample": _output_bytes(workdir / "pipeline"),
        "voxels": int(np.prod(p.shape)),
        "example_inputs": [{k: r[k] for k in ("template_image_uri", "template_label_uri", "seed")} | {"mask": r["mask"]}
                           for r in mgm_rows[:2]],
    }


def _output_bytes(run: Path) -> dict:
    """Mean bytes per sample of each output file kind, from the files the pipeline wrote."""
    sizes: dict[str, list[int]] = {}
    for f in (run / "samples").iterdir():
        sizes.setdefault(f.name.split("_", 1)[1], []).append(f.stat().st_size)
    return {k: int(np.mean(v)) for k, v in sorted(sizes.items())}


def ssv_and_cache(preset: str, steps: int, every: int, inputs: list[dict]) -> dict:
    from fcas.synthesis.sampler import SamplerSettings, SamplerStage

    torch.set_num_threads(1)
    ckpt = str(ROOT / "checkpoints" / preset)
    times = {}
    for mode in ("off", "latent", "image", "off"):       # off twice: the first run warms caches
        stage = SamplerStage(ckpt, SamplerSettings(steps=steps, ssv_mode=mode, ssv_every=every))
        t0 = time.perf_counter()
        for x in inputs:
            stage.synthesize_one(x["mask"], int(x["seed"]), str(x["template_image_uri"]), str(x["template_label_uri"]))
        times[mode] = (time.perf_counter() - t0) / len(inputs)
    # condition embedding once per sample vs every step, on the same c_raw and seed
    bundle = stage.bundle
    cond = bundle.condition
    x = inputs[0]
    img, lab = read_nifti(str(x["template_image_uri"])), read_nifti(str(x["template_label_uri"]))
    c_raw = build_c_raw(torch.from_numpy(np.asarray(x["mask"]).astype(np.int64))[None],
                        torch.from_numpy(lab.array.astype(np.int64))[None], hu_to_unit(img.array)[None, None],
                        cond.label_schema, cond.encoding, cond.mask_only)
    cache = {}
    for cached in (True, False, True, False):
        t0 = time.perf_counter()
        with torch.no_grad():
            sample(bundle, c_raw, torch.Generator().manual_seed(1), steps=steps, cache_condition=cached)
        cache.setdefault(cached, []).append(time.perf_counter() - t0)
    off = times["off"]
    return {
        "steps": steps, "ssv_every": every, "threads": 1,
        "seconds_per_sample": {k: round(v, 3) for k, v in times.items()},
        "ssv_overhead_latent": round(times["latent"] / off - 1, 4),
        "ssv_overhead_image": round(times["image"] / off - 1, 4),
        "sampling_seconds_condition_cached": round(min(cache[True]), 3),
        "sampling_seconds_condition_every_step": round(min(cache[False]), 3),
        "condition_cache_speedup": round(min(cache[False]) / min(cache[True]), 3),
    }


def driver_rss(ns: list[int], workdir: Path) -> dict:
    from fcas.training.tcdm import smoke_checkpoint

    ckpt = smoke_checkpoint(str(workdir / "tiny-ckpt"))
    out = {}
    for n in ns:
        run = workdir / f"rss-{n}"
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "jobs/synthesize.py", "preset=tiny", f"n={n}", f"out={run}", f"checkpoint={ckpt}",
             "sampler.steps=2", "ssv.every=1", "preview=false", "templates=phantom:4", "progress=false"],
            cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"synthesize n={n} failed:\n{proc.stderr[-3000:]}")
        s = json.loads((run / "summary.json").read_text())
        out[n] = {"peak_rss_mb_driver": s["peak_rss_mb_driver"], "n_written": s["n_written"],
                  "seconds": round(time.perf_counter() - t0, 1)}
    lo, hi = min(ns), max(ns)
    return {"runs": out, "rss_ratio_large_over_small": round(out[hi]["peak_rss_mb_driver"] / out[lo]["peak_rss_mb_driver"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--rss", type=int, nargs=2, default=[20, 200])
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    result = {"host": platform.node(), "cpus": __import__("os").cpu_count(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="fcas-bench-") as tmp:
        work = Path(tmp)
        pipe = pipeline_vs_stages(a.preset, a.n, a.steps, a.every, work)
        inputs = pipe.pop("example_inputs")
        result["pipeline"] = pipe
        print(f"[pipeline] {a.preset}: {a.n} more samples cost {a.n / pipe['pipeline_marginal_samples_per_s']:.1f} s "
              f"= {pipe['pipeline_marginal_samples_per_s']} samples/s (start-up {pipe['pipeline_startup_s']} s); "
              f"stages alone (samples/s): "
              f"{pipe['stage_alone_samples_per_s']}; pipeline / slowest ({pipe['slowest_stage']}) = "
              f"{pipe['pipeline_over_slowest_stage']}  (goal >= 0.9)")
        ssv = ssv_and_cache(a.preset, a.steps, a.every, inputs)
        result["ssv"] = ssv
        print(f"[ssv] s/sample {ssv['seconds_per_sample']}: overhead latent {ssv['ssv_overhead_latent']:+.1%} "
              f"(goal <= 10%), image {ssv['ssv_overhead_image']:+.1%}")
        print(f"[cache] condition embedded once {ssv['sampling_seconds_condition_cached']} s vs every step "
              f"{ssv['sampling_seconds_condition_every_step']} s: {ssv['condition_cache_speedup']}x")
        if not a.skip_rss:
            rss = driver_rss(sorted(a.rss), work)
            result["driver_rss"] = rss
            print(f"[rss] driver peak RSS (MB) by n: "
                  f"{ {n: r['peak_rss_mb_driver'] for n, r in rss['runs'].items()} }; "
                  f"ratio {rss['rss_ratio_large_over_small']} (must not grow with n)")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
