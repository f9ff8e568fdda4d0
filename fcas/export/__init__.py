"""Exports of FCaS data to the formats other tools read (nnU-Net v2 raw datasets)."""
from fcas.export.nnunet import ExportSettings, export_nnunet, group_kfold_splits

__all__ = ["ExportSettings", "export_nnunet", "group_kfold_splits"]
