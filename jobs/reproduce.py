"""Miniature reproduction of the paper's Tables 1, 3 and 4 on phantoms -> docs/results.md (``make reproduce``).

    python jobs/reproduce.py                 # full scale (1 h 09 min on 2 CPU cores; every stage cached, reruns resume)
    python jobs/reproduce.py scale=smoke     # every stage in seconds, results under outputs/
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fcas.pipeline.commands import run_job  # noqa: E402  (the job itself: fcas/pipeline/commands/<job>.py)

if __name__ == "__main__":
    run_job("reproduce")
