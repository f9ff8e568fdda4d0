"""Export a synthesis run and/or prepared cases as an nnU-Net v2 raw dataset (grouped 5-fold splits).

    python jobs/export_nnunet.py run=outputs/syn-001 out=/data/nnUNet_raw dataset_id=501 name=FCaSSyn
    python jobs/export_nnunet.py cases=outputs/prepare/cases.parquet out=s3://lab/nnUNet_raw \
        dataset_id=502 name=FCaSReal cardiac_only=false
    python jobs/export_nnunet.py run=s3://lab/fcas/syn-001 cases=s3://lab/fcas/cases existing=resume
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fcas.pipeline.commands import run_job  # noqa: E402  (the job itself: fcas/pipeline/commands/<job>.py)

if __name__ == "__main__":
    run_job("export_nnunet")
