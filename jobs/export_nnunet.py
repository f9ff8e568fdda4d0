"""Export a synthesis run and/or prepared cases as an nnU-Net v2 raw dataset (grouped 5-fold splits).

    python jobs/export_nnunet.py run=outputs/syn-001 out=/data/nnUNet_raw dataset_id=501 name=FCaSSyn
    python jobs/export_nnunet.py cases=outputs/prepare/cases.parquet out=s3://lab/nnUNet_raw \
        dataset_id=502 name=FCaSReal cardiac_only=false
    python jobs/export_nnunet.py run=s3://lab/fcas/syn-001 cases=s3://lab/fcas/cases existing=resume
"""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fcas.pipeline.cli import user_errors  # noqa: E402
from fcas.export.nnunet import export_nnunet, settings_from_dict  # noqa: E402


def run(cfg: DictConfig) -> dict:
    s = export_nnunet(settings_from_dict(OmegaConf.to_container(cfg, resolve=True)))
    print(f"export_nnunet: {s['numTraining']} training + {s['numTest']} test cases, {s['rejected']} rejected, "
          f"{s['skipped']} kept from an earlier run, {s['folds']} folds in {s['seconds']} s -> {s['dataset']}")
    return s


@hydra.main(config_path="../configs", config_name="export_nnunet", version_base=None)
@user_errors("export_nnunet")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
