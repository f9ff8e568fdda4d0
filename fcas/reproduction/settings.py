"""Settings of the miniature reproduction (``configs/reproduce.yaml``, one scale) and the Ray jobs it calls.

What the stages are and what each computes: :mod:`fcas.reproduction`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from fcas.settings import build

__all__ = ["ReproduceSettings", "Runners", "ARMS"]

ARMS = ("real_only", "cal", "plain")


@dataclass(frozen=True)
class ReproduceSettings:
    work: str                                   # cached stage results and every artefact
    results: str = "docs/results.md"            # the report (markdown)
    plots: str = "docs/results"                 # PNGs, linked from the report relative to it
    scale: str = "full"
    preset: str = "demo"
    shape: tuple[int, int, int] = (64, 64, 64)
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    schema: str = "cardiac"
    # data
    library_n: int = 16                         # phantom:N template library (25 % template, 75 % reference)
    library: str | None = None                  # or an already prepared cases.parquet (template/reference splits)
    n_train: int = 20
    n_test: int = 10
    n_val: int = 0                              # validation phantoms for early stopping (0: none)
    real_offset: int = 5000
    real_domain: str = "standard"               # acquisition of the "real" segmentation phantoms (fcas.phantom.DOMAINS)
    # Table 1
    checkpoint: str = "checkpoints/demo"
    mask_only_checkpoint: str = "checkpoints/demo-mask-only"
    pairs: int = 10
    site_size: int | None = None                # Table 1's test phantoms in sites of this many seeds (fcas.phantom.sites)
    table1_steps: int = 20
    oracle_mean_n: int = 16                     # phantoms averaged for the population-mean oracle (template_oracles)
    fid_resize: tuple[int, int, int] | None = None
    # synthesis
    syn_n: int = 400
    syn_steps: int = 10
    syn_seed: int = 0
    ssv_every: int = 2
    ssv_mode: str = "latent"                    # latent | image (see benchmarks/ssv_auroc.py)
    ssv_start: float = 0.0                      # fraction of the steps skipped before SSV collects
    sampler_actors: int = 1
    # segmentation
    segnet: Mapping[str, Any] = field(default_factory=dict)
    pretrain_steps: int = 300
    finetune_steps: int = 150
    batch_size: int = 2
    crop: tuple[int, int, int] | None = None    # random training window (inference: sliding window of this size)
    lr: float = 1e-3
    finetune_lr: float = 5e-4
    augment: Mapping[str, Any] = field(default_factory=dict)
    val_every: int = 0                          # fine-tuning steps between validations (0: fixed step counts)
    patience: int = 0                           # validations without a better Dice before fine-tuning stops
    seg_amp_dtype: str | None = None            # bfloat16: segmentation nets train (and validate) in bf16 autocast
    rdice_radius: int = 2
    threads: int = 2
    stop_after: str | None = None               # data | table1 | synthesis: stop there (the report shows what ran)

    def __post_init__(self) -> None:
        for k in ("shape", "spacing", "seeds"):
            object.__setattr__(self, k, tuple(getattr(self, k)))
        if self.crop is not None:
            object.__setattr__(self, "crop", tuple(int(v) for v in self.crop))
        if self.fid_resize is not None:
            object.__setattr__(self, "fid_resize", tuple(int(v) for v in self.fid_resize))
        if self.stop_after not in (None, "data", "table1", "synthesis", "seg"):
            raise ValueError(f"stop_after must be null, data, table1, synthesis or seg, got {self.stop_after!r}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        if self.val_every and self.n_val < 1:
            raise ValueError(f"val_every={self.val_every} needs n_val >= 1 validation phantoms")
        if self.site_size is not None and self.site_size < 2:
            raise ValueError(f"site_size must be >= 2 (a template from the target's site) or null, got {self.site_size}")
        if self.n_train < 1 or self.n_test < 2 or self.pairs < 2 or self.syn_n < 1 or self.library_n < 2:
            raise ValueError(f"need n_train >= 1, n_test >= 2, pairs >= 2, syn_n >= 1, library_n >= 2; got "
                             f"{self.n_train}, {self.n_test}, {self.pairs}, {self.syn_n}, {self.library_n}")
        from fcas.phantom import DOMAINS

        if self.real_domain not in DOMAINS:
            raise ValueError(f"real_domain must be one of {', '.join(DOMAINS)}, got {self.real_domain!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ReproduceSettings":
        return build(cls, d, what="reproduce settings")

    @property
    def _domain(self) -> str:
        return "" if self.real_domain == "standard" else f":{self.real_domain}"

    @property
    def train_source(self) -> str:
        """The "real" segmentation cases (in :attr:`real_domain`)."""
        return f"phantom:{self.n_train}@{self.real_offset}{self._domain}"

    @property
    def test_source(self) -> str:
        """Table 1's held-out pairs: the TCDM's own (standard) domain."""
        return f"phantom:{self.n_test}@{self.real_offset + self.n_train}{self._sites}"

    @property
    def _sites(self) -> str:
        return "" if self.site_size is None else f"/{self.site_size}"

    @property
    def seg_test_source(self) -> str:
        """The segmentation test cases: the seeds of :attr:`test_source` in :attr:`real_domain` (independent
        phantoms: the sites are Table 1's)."""
        return f"phantom:{self.n_test}@{self.real_offset + self.n_train}{self._domain}"

    @property
    def floor_source(self) -> str:
        """Table 1's real-vs-real FID floor: as many other (standard) phantoms as pairs, after train and test."""
        return f"phantom:{self.pairs}@{self.real_offset + self.n_train + self.n_test}{self._sites}"

    @property
    def val_source(self) -> str | None:
        """Validation phantoms (in :attr:`real_domain`): after the train, test and FID-floor seeds."""
        if not self.n_val:
            return None
        return f"phantom:{self.n_val}@{self.real_offset + self.n_train + self.n_test + self.pairs}{self._domain}"


@dataclass(frozen=True)
class Runners:
    """The Ray jobs the reproduction calls (wired in by :mod:`fcas.pipeline.reproduce`).

    ``prepare(source, out, shape, spacing, splits, seed) -> summary dict`` (writes ``out/cases.parquet``);
    ``synthesize(n, out, checkpoint, templates, run_seed, steps, ssv_every, shape, spacing, sampler_actors,
    ssv_mode, ssv_start)
    -> summary dict`` (a synthesis run under ``out``, resumable).
    """

    prepare: Callable[..., dict]
    synthesize: Callable[..., dict]
