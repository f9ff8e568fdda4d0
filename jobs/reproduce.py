"""Miniature reproduction of the seed's Tables 1, 3 and 4 on phantoms -> docs/results.md (``make reproduce``).

    python jobs/reproduce.py                 # full scale (estimated ~70 min on 2 free CPU cores; reruns resume)
    python jobs/reproduce.py scale=smoke     # every stage in seconds, results under outputs/
"""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fcas.pipeline.cli import user_errors  # noqa: E402
from fcas.pipeline.reproduce import run as _run  # noqa: E402


def run(cfg: DictConfig) -> dict:
    out = _run(cfg)
    print(f"reproduce: results in {out['results']}; stage seconds {out['stages']}")
    return out


@hydra.main(config_path="../configs", config_name="reproduce", version_base=None)
@user_errors("reproduce")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
