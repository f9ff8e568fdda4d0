"""Validate, reorient, resample and crop cases onto the preset grid; write cases.parquet + rejects.parquet.

    python jobs/prepare.py source=phantom:50 out=outputs/cases preset=demo
    python jobs/prepare.py source=dir:/data/mmwhs out=s3://lab/fcas/cases label_mapping=mmwhs \
        images='*_image.nii.gz' labels.label='*_label.nii.gz'
    # the FCaS recipe for ImageCAS: its coronaries + TotalSegmentator's heart chambers and surroundings (docs/data.md)
    python jobs/prepare.py source=dir:/data/imagecas out=outputs/imagecas images='*.img.nii.gz' labels.label=null \
        labels.coronary='*.label.nii.gz' labels.chambers='heartchambers_highres/*' labels.surroundings='total/*'
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fcas.pipeline.commands import run_job  # noqa: E402  (the job itself: fcas/pipeline/commands/<job>.py)

if __name__ == "__main__":
    run_job("prepare")
