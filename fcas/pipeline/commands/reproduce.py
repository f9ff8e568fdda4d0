"""``fcas reproduce``: miniature reproduction of the paper's Tables 1, 3 and 4 on phantoms -> docs/results.md."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from fcas.bundled import config_dir
from fcas.cli import user_errors
from fcas.pipeline.commands import run_job


def run(cfg: DictConfig) -> dict:
    from fcas.pipeline.reproduce import run as _run

    out = _run(cfg)
    print(f"reproduce: results in {out['results']}; stage seconds {out['stages']}")
    return out


@hydra.main(config_path=str(config_dir()), config_name="reproduce", version_base=None)
@user_errors("reproduce")
def main(cfg: DictConfig) -> None:
    run(cfg)


def command() -> None:
    """The ``fcas-reproduce`` console command (= ``fcas reproduce``)."""
    run_job("reproduce")
