"""Size a synthesis run: sampler actors, CPU workers, wall time, GPU-hours, bytes and cost, each figure
with its source (configs/hardware/<gpu>.yaml, benchmarks/results/*.json, or the formula used).

    python jobs/plan.py n=100000 preset=paper gpu=a100-80gb sampler_nodes=16
    python jobs/plan.py n=50 preset=demo gpu=cpu-2core sampler_nodes=1      # this machine
    python jobs/plan.py ... format=json            # the same numbers as JSON on stdout (or json=<path>)
"""
import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fcas.pipeline.cli import user_errors  # noqa: E402
from fcas.pipeline.jobs import plan_request_from_cfg  # noqa: E402
from fcas.planning import format_plan, make_plan, plan_to_json  # noqa: E402


def run(cfg: DictConfig) -> dict:
    plan = make_plan(plan_request_from_cfg(cfg))
    as_json = plan_to_json(plan)
    if cfg.json:
        Path(str(cfg.json)).write_text(json.dumps(as_json, indent=2) + "\n")
    print(json.dumps(as_json, indent=2) if cfg.format == "json" else format_plan(plan))
    return as_json


@hydra.main(config_path="../configs", config_name="plan", version_base=None)
@user_errors("plan")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
