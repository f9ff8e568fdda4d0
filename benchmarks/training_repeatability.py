"""Does the same TCDM training command give the same weights twice? Two Ray Train runs, one after the other in one Ray.

    python benchmarks/training_repeatability.py [--cases 8] [--steps 6] [--workers 1]

Each run is ``jobs/train_tcdm.py``'s Ray Train job at the tiny preset (random VAE, phantoms streamed through
Ray Data into the worker's case buffer, as ``make weights`` streams them), with the same config and seed;
the script compares every ControlNet tensor of the two final checkpoints and prints IDENTICAL or DIFFERENT
with the largest difference. With one worker whose buffer holds every case the runs must agree bit for bit
(the buffer is filled in case-id order, whatever order Ray Data's parallel tasks deliver in); with more
workers than that, or a buffer smaller than the shard, which cases a worker holds depends on the stream.
About 65 s on 2 CPU cores.
"""
import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> bool:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=8, help="training phantoms (phantom:N)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP)")
    args = ap.parse_args(argv)
    if args.cases < 2 or args.steps < 1 or args.workers < 1:
        ap.error("--cases >= 2, --steps >= 1 and --workers >= 1")

    import ray
    import torch

    from fcas.models.checkpoint import load_checkpoint
    from fcas.pipeline.train_tcdm import run
    from fcas.presets import load_preset

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    p = load_preset("tiny")
    tiny = {"name": p.name, "shape": list(p.shape), "spacing": list(p.spacing)}
    states = []
    with tempfile.TemporaryDirectory(prefix="fcas-repeat-") as tmp:
        for k in range(2):
            out = f"{tmp}/run{k}"
            cfg = {"preset": tiny, "model": {"name": "tiny"}, "data": f"phantom:{args.cases}", "out": out,
                   "vae": None,
                   "train": {"steps": args.steps, "checkpoint_every": args.steps, "keep_checkpoints": 0,
                             "buffer_cases": args.cases},
                   "trainer": {"num_workers": args.workers, "cpus_per_worker": 1 / args.workers, "progress": False,
                               "storage_path": f"{out}_ray"}}
            summary = run(cfg)
            states.append(load_checkpoint(summary["latest_checkpoint"]).state_dict("controlnet"))
    ray.shutdown()
    diff = max(float((states[0][k].float() - states[1][k].float()).abs().max()) for k in states[0])
    same = diff == 0.0
    print(f"{'IDENTICAL' if same else 'DIFFERENT'}: {args.workers} worker(s), {args.cases} cases, {args.steps} steps; "
          f"largest ControlNet weight difference {diff:.3g}")
    return same


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
