"""The sampler stage: deformed reference mask + template pair -> synthetic image + confidence map.

:class:`SamplerStage` is a callable class for Ray Data's actor pools (``map_batches(SamplerStage,
fn_constructor_kwargs=..., concurrency=(min, max), num_gpus=...)``): the TCDM bundle is loaded
once per actor in ``__init__``; ``__call__`` maps a numpy batch to a numpy batch. No Ray here.

Per sample ``i``: ``c_raw = bits(cardiac_only(M̃_A)) ⊕ bits(M_B) ⊕ I_B`` (TCDM conditioning),
reverse sampling with a ``torch.Generator`` seeded by the plan's ``seed`` (from (run_seed, i)),
x̂0 collected every ``ssv.every`` steps, the decoded image in HU and ``CM`` from SSV. Samples are
drawn one at a time so that sample ``i``'s output never depends on its batch neighbours.

The output label map is ``cardiac_only(M̃_A)``: the eight cardiac classes the image was
conditioned on (the surroundings in the image come from the template and carry no label).
"""
from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np
import torch

from fcas.diffusion.conditioning import build_c_raw, hu_to_unit, unit_to_hu
from fcas.diffusion.sampling import decode_latent, sample
from fcas.diffusion.ssv import SSV_MODES, ssv_confidence
from fcas.prepare import load_case
from fcas.diffusion.bundle import load_tcdm
from fcas.settings import build
from fcas.synthesis.faults import FaultPlan, InjectedFault

__all__ = ["SamplerSettings", "SamplerStage"]


@dataclass(frozen=True)
class SamplerSettings:
    """Reverse sampling and SSV settings (``sampler.*`` and ``ssv.*`` of configs/synthesize.yaml)."""

    steps: int = 20
    scheduler: str = "ddim"          # ddim | ddpm | rflow (rflow needs an rflow-trained model)
    eta: float = 0.0
    ssv_mode: str = "latent"         # latent | image | off
    ssv_every: int = 4               # k: collect x̂0 at steps 0, k, 2k, ...
    ssv_collect: str = "x0"          # x0 (default reading) | latent (the paper's literal Z_t)
    ssv_quantile: float = 0.999
    ssv_start: float = 0.0           # fraction of the steps skipped before collecting (0.5: late half)
    window: tuple[int, int, int] | None = None   # latent sliding window; None = whole latent
    decode_window: tuple[int, int, int] | None = None   # latent window of the VAE decode; None = whole
    device: str = "auto"             # auto | cpu | cuda

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"sampler.steps must be >= 1, got {self.steps}")
        if self.scheduler not in ("ddim", "ddpm", "rflow"):
            raise ValueError(f"sampler.scheduler must be ddim, ddpm or rflow, got {self.scheduler!r}")
        if self.ssv_mode not in (*SSV_MODES, "off"):
            raise ValueError(f"ssv.mode must be one of {(*SSV_MODES, 'off')}, got {self.ssv_mode!r}")
        for name in ("window", "decode_window"):
            w = getattr(self, name)
            if w is not None and (len(w) != 3 or any(int(v) < 1 for v in w)):
                raise ValueError(f"sampler.{name} must be three positive latent sizes or null, got {w!r}")
        if not 0.0 <= self.ssv_start < 1.0:
            raise ValueError(f"ssv.start must be in [0, 1), got {self.ssv_start}")
        if self.ssv_mode != "off" and (self.ssv_every < 1 or len(self.ssv_steps()) < 2):
            raise ValueError(f"ssv.every={self.ssv_every} with ssv.start={self.ssv_start} and {self.steps} "
                             f"steps collects {len(self.ssv_steps()) if self.ssv_every >= 1 else 0} "
                             "intermediates; SSV needs >= 2 (lower ssv.every or ssv.start, or raise sampler.steps)")

    def ssv_steps(self) -> list[int]:
        """Reverse-step indices whose intermediate SSV collects."""
        first = int(self.ssv_start * self.steps)
        return list(range(first, self.steps, self.ssv_every))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class SamplerStage:
    """``map_batches`` callable (actor): needs columns ``sample_id``, ``seed``, ``mask`` (B, D, H, W)
    uint8, ``template_image_uri``, ``template_label_uri``; adds ``image`` (B, D, H, W) int16 HU,
    ``label`` (B, D, H, W) uint8, ``confidence`` (B, D, H, W) float32, ``sampler_error`` (str,
    empty when fine), ``sample_s``, ``decode_s``, ``ssv_s`` and ``checkpoint_digest``."""

    def __init__(self, checkpoint: str, settings: SamplerSettings | Mapping | None = None, cache_size: int = 8,
                 tries: int = 2, faults: FaultPlan | None = None, expected_digest: str | None = None,
                 threads: int = 0):
        if int(threads) > 0:   # Ray sets OMP_NUM_THREADS=1 for a fractional-CPU actor; a CPU machine may give more
            torch.set_num_threads(int(threads))
        self.settings = settings if isinstance(settings, SamplerSettings) else build(SamplerSettings, settings)
        dev = self.settings.device
        self.device = torch.device("cuda" if dev == "auto" and torch.cuda.is_available() else
                                   ("cpu" if dev == "auto" else dev))
        self.bundle = load_tcdm(checkpoint, expected_digest=expected_digest).to(self.device)
        self.cond = self.bundle.condition
        self.schema = self.cond.label_schema
        self.cache_size = cache_size
        if int(tries) < 1:
            raise ValueError(f"tries must be >= 1, got {tries!r}")
        self.tries = int(tries)
        self.faults = faults
        self._templates: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def _template(self, image_uri: str, label_uri: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = f"{image_uri}|{label_uri}"
        if key not in self._templates:
            image, label, _ = load_case(image_uri, label_uri, self.schema)   # every check of prepare
            self._templates[key] = (hu_to_unit(image)[None, None], torch.from_numpy(label.astype(np.int64))[None])
            while len(self._templates) > self.cache_size:
                self._templates.popitem(last=False)
        self._templates.move_to_end(key)
        return self._templates[key]

    @torch.no_grad()
    def synthesize_one(self, mask: np.ndarray, seed: int, image_uri: str, label_uri: str) -> dict:
        """One sample: ``mask`` (D, H, W) reference label map -> image HU, label, confidence, timings."""
        s = self.settings
        t_img, t_lab = self._template(image_uri, label_uri)
        ref = torch.from_numpy(np.asarray(mask).astype(np.int64))[None]
        if tuple(ref.shape[1:]) != tuple(t_lab.shape[1:]):
            raise ValueError(f"reference mask grid {tuple(ref.shape[1:])} differs from template {label_uri} "
                             f"grid {tuple(t_lab.shape[1:])}; prepare all cases with one preset")
        c_raw = build_c_raw(ref, None if self.cond.mask_only else t_lab, None if self.cond.mask_only else t_img,
                            self.schema, self.cond.encoding, self.cond.mask_only).to(self.device)
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        t0 = time.perf_counter()
        res = sample(self.bundle, c_raw, gen, s.steps, s.scheduler,
                     collect_every=0 if s.ssv_mode == "off" else s.ssv_every, collect=s.ssv_collect,
                     collect_from=s.ssv_start, eta=s.eta, window=s.window)
        t1 = time.perf_counter()
        unit = decode_latent(self.bundle.vae, res.latent, self.bundle.scale_factor, window=s.decode_window)
        t2 = time.perf_counter()
        if s.ssv_mode == "off":
            cm = torch.ones_like(unit)
        else:
            cm = ssv_confidence(res.intermediates, s.ssv_mode, out_shape=unit.shape[2:], vae=self.bundle.vae,
                                scale_factor=self.bundle.scale_factor, decode_window=s.decode_window,
                                quantile=s.ssv_quantile)
        t3 = time.perf_counter()
        image = unit_to_hu(unit)[0, 0].cpu().numpy()
        conf = cm[0, 0].cpu().numpy().astype(np.float32)
        error = ""
        if not (np.isfinite(image).all() and np.isfinite(conf).all()):
            error = "sampler produced non-finite values (NaN/inf)"
        return {
            "image": np.nan_to_num(np.rint(image)).astype(np.int16),
            "label": self.schema.cardiac_only(np.asarray(mask, dtype=np.uint8)),
            "confidence": np.nan_to_num(conf),
            "sampler_error": error,
            "sample_s": t1 - t0, "decode_s": t2 - t1, "ssv_s": t3 - t2,
        }

    def _one(self, batch: Mapping[str, np.ndarray], i: int) -> dict | None:
        """Row ``i`` synthesized, retried up to ``tries`` times; a row that still fails (or whose MGM
        already failed) returns ``None`` with the reason in ``self._error``."""
        self._error = ""
        if "mgm_error" in batch and str(batch["mgm_error"][i]):
            return None
        sid = int(batch["sample_id"][i])
        last = None
        for _ in range(self.tries):
            try:
                if self.faults is not None and self.faults.sampler_should_fail(sid):
                    raise InjectedFault(f"injected sampler failure for sample {sid}")
                return self.synthesize_one(batch["mask"][i], int(batch["seed"][i]),
                                           str(batch["template_image_uri"][i]), str(batch["template_label_uri"][i]))
            except Exception as e:  # one sample's failure must not stop the run: bounded tries, then a reject
                last = e
        self._error = f"sampler failed after {self.tries} tries: {type(last).__name__}: {' '.join(str(last).split())}"
        return None

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["sample_id"])
        outs, errors = [], []
        for i in range(n):
            outs.append(self._one(batch, i))
            errors.append(self._error)
        good = next((o for o in outs if o is not None), None)
        for i, o in enumerate(outs):
            if o is None:   # placeholder arrays: the writer rejects this row by its error
                shape = good["image"].shape if good is not None else np.shape(batch["mask"][i])
                outs[i] = {"image": np.zeros(shape, np.int16), "label": np.zeros(shape, np.uint8),
                           "confidence": np.zeros(shape, np.float32), "sampler_error": errors[i],
                           "sample_s": 0.0, "decode_s": 0.0, "ssv_s": 0.0}
        result = {k: np.asarray(v) for k, v in batch.items() if k != "mask"}
        for key in ("image", "label", "confidence"):
            result[key] = _stack([o[key] for o in outs])
        for key in ("sample_s", "decode_s", "ssv_s"):
            result[key] = np.asarray([o[key] for o in outs], dtype=np.float64)
        result["sampler_error"] = np.asarray([o["sampler_error"] for o in outs], dtype=object)
        result["checkpoint_digest"] = np.asarray([self.bundle.digest] * len(outs), dtype=object)
        result["sampled_at"] = np.full(len(outs), time.time())   # wall clock (s), for the writer's lag
        return result


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    """(B, ...) array, or a (B,) object array when the shapes differ."""
    if arrays and all(a.shape == arrays[0].shape for a in arrays):
        return np.stack(arrays)
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out
