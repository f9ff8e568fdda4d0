"""Does the writer keep up with the sampler? Sampled-but-unsaved samples over a run, from the manifest.

    python benchmarks/backpressure.py [--n 200] [--steps 2] [--cpus 2] [--json benchmarks/results/backpressure.json]

Runs the synthesis job at the tiny preset (bundled ``checkpoints/tiny``, phantom:4 templates, no
previews) on a local Ray with ``--cpus`` logical CPUs, then reads every manifest row's
``timings.sampled_at`` (the sampler actor returned the sample) and ``timings.written_at`` (its files
exist; the batch's shard follows). At each of those instants it counts the samples sampled and not
yet written (the worst count, in samples and in writer batches), and the complete writer batches
(all their samples sampled) not yet written: 1 means the writer only ever had the batch it was
writing, so every sample is saved within its own writer batch; a writer that is never scheduled
shows as a backlog that grows with n.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def lag_profile(rows: list[dict]) -> dict:
    """Worst and mean sampled-minus-written over the run, from the rows' ``timings``."""
    events = sorted([(r["timings"]["sampled_at"], 1) for r in rows] + [(r["timings"]["written_at"], -1) for r in rows])
    level, worst, area, last_t = 0, 0, 0.0, events[0][0] if events else 0.0
    for t, d in events:
        area += level * (t - last_t)
        level, last_t = level + d, t
        worst = max(worst, level)
    span = (events[-1][0] - events[0][0]) if events else 0.0
    # writer batches (rows sharing one written_at): complete when their last sample was sampled; the
    # backlog is the number of complete batches not yet written (1 = only the one being written)
    batches: dict[float, float] = {}
    for r in rows:
        w = r["timings"]["written_at"]
        batches[w] = max(batches.get(w, 0.0), r["timings"]["sampled_at"])
    marks = sorted([(c, 1) for c in batches.values()] + [(w, -1) for w in batches])
    backlog, worst_backlog = 0, 0
    for _, d in marks:
        backlog += d
        worst_backlog = max(worst_backlog, backlog)
    return {"max_unsaved": worst, "mean_unsaved": round(area / span, 2) if span > 0 else 0.0,
            "max_complete_batches_unwritten": worst_backlog, "batches": len(batches), "span_s": round(span, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import ray

    from fcas.pipeline.synthesize import Resources, SynthesisJob, run_synthesis
    from fcas.presets import load_preset
    from fcas.synthesis.outputs import read_run_manifest
    from fcas.synthesis.sampler import SamplerSettings

    ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    tiny = load_preset("tiny")
    res = Resources()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run")
        t0 = time.time()
        summary = run_synthesis(SynthesisJob(n=a.n, out=out, checkpoint=str(ROOT / "checkpoints" / "tiny"),
                                             templates="phantom:4", shape=tiny.shape, spacing=tiny.spacing,
                                             sampler=SamplerSettings(steps=a.steps, ssv_every=1), preview=False,
                                             resources=res, config_hash="backpressure"), progress=False)
        rows = read_run_manifest(out).select(["sample_id", "timings"]).to_pylist()
        for r in rows:
            r["timings"] = dict(r["timings"])
        wall = time.time() - t0
    prof = lag_profile(rows)
    prof.update(n=a.n, written=len(rows), writer_batch_size=res.writer_batch_size, cpus=a.cpus, wall_s=round(wall, 1),
                samples_per_s=summary["samples_per_s"],
                max_unsaved_batches=round(prof["max_unsaved"] / res.writer_batch_size, 2))
    print(json.dumps(prof, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(prof, indent=1) + "\n")
    ray.shutdown()


if __name__ == "__main__":
    main()
