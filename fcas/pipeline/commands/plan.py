"""``fcas plan``: size a synthesis run (actors, workers, wall time, GPU-hours, bytes, cost), each figure sourced."""
from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fcas.bundled import config_dir
from fcas.pipeline.cli import user_errors
from fcas.pipeline.commands import run_job
from fcas.pipeline.jobs import plan_request_from_cfg
from fcas.planning import format_plan, make_plan, plan_to_json


def run(cfg: DictConfig) -> dict:
    plan = make_plan(plan_request_from_cfg(cfg))
    as_json = plan_to_json(plan)
    if cfg.json:
        Path(str(cfg.json)).write_text(json.dumps(as_json, indent=2) + "\n")
    print(json.dumps(as_json, indent=2) if cfg.format == "json" else format_plan(plan))
    return as_json


@hydra.main(config_path=str(config_dir()), config_name="plan", version_base=None)
@user_errors("plan")
def main(cfg: DictConfig) -> None:
    run(cfg)


def command() -> None:
    """The ``fcas-plan`` console command (= ``fcas plan``)."""
    run_job("plan")
