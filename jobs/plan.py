"""Size a synthesis run: sampler actors, CPU workers, wall time, GPU-hours, bytes and cost, each figure
with its source (configs/hardware/<gpu>.yaml, benchmarks/results/*.json, or the formula used).

    python jobs/plan.py n=100000 preset=paper gpu=a100-80gb sampler_nodes=16
    python jobs/plan.py n=50 preset=demo gpu=cpu-2core sampler_nodes=1      # this machine
    python jobs/plan.py ... format=json            # the same numbers as JSON on stdout (or json=<path>)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fcas.pipeline.commands import run_job  # noqa: E402  (the job itself: fcas/pipeline/commands/<job>.py)

if __name__ == "__main__":
    run_job("plan")
