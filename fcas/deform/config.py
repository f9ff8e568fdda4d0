"""MGM configuration: the Hydra group ``configs/mgm/`` resolved into one frozen dataclass.

``load_mgm_config("default")`` reads ``configs/mgm/default.yaml``; :meth:`MGMConfig.from_dict` takes
the same mapping from a composed Hydra config (``cfg.mgm``). Unknown keys and invalid values raise
``ValueError`` naming the field (``mgm.ranges.zeta_mm: low ...``). Hand-written.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Mapping


from fcas.deform.mgm import CLOSINGS, OVERLAPS
from fcas.deform.params import MGMRanges
from fcas.deform.qc import QCThresholds
from fcas.labels import read_config
from fcas.settings import build

__all__ = ["MGMConfig", "load_mgm_config", "KEEPS", "ON_FAIL"]

KEEPS = ("cardiac", "all")
ON_FAIL = ("keep_last", "identity")


@dataclass(frozen=True)
class MGMConfig:
    """Everything MGM needs besides the mask.

    Attributes:
        ranges: parameter sampling ranges (:class:`MGMRanges`).
        closing: ``"closing"`` (size-preserving), ``"maxpool"`` (the paper's Eq. 6) or ``"none"``.
        closed_classes: ``"all"`` classes present, or ``"cardiac"`` only (surroundings unclosed).
        overlap: ``"keep"`` (warped voxels keep their class, closing fills background) or
            ``"priority"`` (highest-priority closed class wins), see :func:`mgm_deform`.
        keep: ``"cardiac"`` -- the template is reduced to the eight cardiac classes first (the
            reference mask M_A of the seed); ``"all"`` -- surroundings are deformed too.
        qc: QC thresholds (:class:`QCThresholds`).
        max_tries: draws per sample before giving up (each try t uses ``(run_seed, sample_id, t)``).
        on_fail: after ``max_tries`` failures keep the last draw (flagged ``qc_passed=0``) or return
            the template itself (``identity``, flagged ``mgm_fallback=1``).
        num_threads: gather threads per call.
    """

    ranges: MGMRanges = field(default_factory=MGMRanges)
    closing: str = "closing"
    closed_classes: str = "all"
    overlap: str = "keep"
    keep: str = "cardiac"
    qc: QCThresholds = field(default_factory=QCThresholds)
    max_tries: int = 5
    on_fail: str = "keep_last"
    num_threads: int = 1

    def __post_init__(self) -> None:
        if self.closing not in CLOSINGS:
            raise ValueError(f"mgm.closing must be one of {CLOSINGS}, got {self.closing!r}")
        if self.closed_classes not in ("all", "cardiac"):
            raise ValueError(f"mgm.closed_classes must be 'all' or 'cardiac', got {self.closed_classes!r}")
        if self.overlap not in OVERLAPS:
            raise ValueError(f"mgm.overlap must be one of {OVERLAPS}, got {self.overlap!r}")
        if self.keep not in KEEPS:
            raise ValueError(f"mgm.keep must be one of {KEEPS}, got {self.keep!r}")
        if self.on_fail not in ON_FAIL:
            raise ValueError(f"mgm.on_fail must be one of {ON_FAIL}, got {self.on_fail!r}")
        for name in ("max_tries", "num_threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ValueError(f"mgm.{name} must be an integer >= 1, got {v!r}")
            object.__setattr__(self, name, int(v))

    @classmethod
    def before_build(cls, d: dict) -> dict:
        """Read by :func:`fcas.settings.build`: a group file may carry its own ``name``."""
        d.pop("name", None)
        return d

    @classmethod
    def from_dict(cls, d: Mapping | None) -> "MGMConfig":
        """Build from a plain dict or an OmegaConf ``DictConfig`` (``cfg.mgm``)."""
        return build(cls, d, where="mgm")

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["ranges"] = self.ranges.to_dict()
        qc = {f.name: getattr(self.qc, f.name) for f in fields(self.qc)}
        qc["volume_ratio"] = list(qc["volume_ratio"])
        qc["adjacency"] = [list(p) for p in qc["adjacency"]]
        if not isinstance(qc["classes"], str):
            qc["classes"] = list(qc["classes"])
        out["qc"] = qc
        return out

    def digest(self) -> str:
        """Short stable hash of the resolved config (stamped into manifest rows)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@lru_cache(maxsize=16)
def load_mgm_config(name_or_path: str = "default") -> MGMConfig:
    """``configs/mgm/<name>.yaml`` (or a YAML path) -> :class:`MGMConfig`."""
    return MGMConfig.from_dict(read_config("mgm", name_or_path, "MGM config"))
