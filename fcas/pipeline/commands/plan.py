"""``fcas plan``: size a synthesis run (actors, workers, wall time, GPU-hours, bytes, cost) or, with
``what=training``, a TCDM training run (steps, GPU-hours, memory per GPU); each figure sourced."""
from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fcas.bundled import config_dir
from fcas.cli import user_errors
from fcas.pipeline.commands import run_job
from fcas.pipeline.jobs import plan_request_from_cfg
from fcas.planning import TrainingPlanRequest, format_plan, make_plan, make_training_plan, plan_to_json


def run(cfg: DictConfig) -> dict:
    req = plan_request_from_cfg(cfg)
    plan = make_training_plan(req) if isinstance(req, TrainingPlanRequest) else make_plan(req)
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
