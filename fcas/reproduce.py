"""Miniature reproduction of the paper's Tables 1, 3 and 4 on phantoms (``make reproduce``).

Stages, each cached as ``<work>/stages/<name>.json`` (a rerun loads it and skips the work; every
run and skip is appended to ``<work>/stage_log.jsonl`` with its seconds):

1. ``data``: the synthesis template library (``phantom:N`` prepared by the prepare job, split
   template / reference); the "real" segmentation cases are phantoms generated in memory from
   seeds ``real_offset ..`` (train) and ``real_offset + n_train ..`` (test), disjoint from the seeds
   the demo TCDM was trained on (0..23) and from the library.
2. ``table1_seed<s>``: held-out pairs ``(A, B)`` of test phantoms, direction B@A, sampled by the
   template-guided and the mask-only checkpoint with the same noise (drawn from ``(seed, pair)``);
   SSIM / RMSE against the true ``I_A`` over the whole volume and FID of the two sets on the
   project's own VAE-encoder features (:class:`fcas.metrics.fid.VAEEncoderFeatures`), with the
   real-vs-real FID floor at the same set size.
3. ``synthesis``: one synthesis run (template-guided checkpoint) shared by every seed.
4. ``seg_<arm>_seed<s>``: a segmentation net (:mod:`fcas.cal`, Ray-free loop) per arm and seed --
   ``real_only`` (the real train cases only, as many steps as pretraining + fine-tuning),
   ``cal`` (pretrain on the synthetic run with the confidence-aware loss, Eq. 9, then fine-tune)
   and ``plain`` (the same with the plain loss, Eq. 8) -- evaluated on the test cases (Dice and
   RDice per cardiac class).
5. the report: markdown tables (mean ± sd over seeds), PNG plots, configuration and stage timings.

The two stages that run Ray jobs (prepare, synthesize) are reached through :class:`Runners`
(``fcas.pipeline.reproduce`` wires the Ray jobs in); everything else runs in this process.
Hand-written orchestration; the science is in :mod:`fcas.diffusion`, :mod:`fcas.cal`,
:mod:`fcas.metrics` and :mod:`fcas.evaluation`.
"""
from __future__ import annotations

import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from fcas.evaluation.report import json_safe
from fcas.io import storage

log = logging.getLogger(__name__)

__all__ = ["ReproduceSettings", "Runners", "run_reproduce", "sample_held_out_pairs", "table1_seed",
           "train_and_evaluate_seg", "render_results", "ARMS"]

ARMS = ("real_only", "cal", "plain")
STAGE_LOG = "stage_log.jsonl"


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
        if self.n_train < 1 or self.n_test < 2 or self.pairs < 2 or self.syn_n < 1 or self.library_n < 2:
            raise ValueError(f"need n_train >= 1, n_test >= 2, pairs >= 2, syn_n >= 1, library_n >= 2; got "
                             f"{self.n_train}, {self.n_test}, {self.pairs}, {self.syn_n}, {self.library_n}")
        from fcas.phantom import DOMAINS

        if self.real_domain not in DOMAINS:
            raise ValueError(f"real_domain must be one of {', '.join(DOMAINS)}, got {self.real_domain!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ReproduceSettings":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown reproduce settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(d))

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
        return f"phantom:{self.n_test}@{self.real_offset + self.n_train}"

    @property
    def seg_test_source(self) -> str:
        """The segmentation test cases: the seeds of :attr:`test_source` in :attr:`real_domain`."""
        return self.test_source + self._domain

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


# ---- stage cache ----------------------------------------------------------------------------

MEASUREMENT_VERSION = 2   # 2: Table 1 scored under the cardiac mask of M_A (1: the whole volume)


def stage_key(s: "ReproduceSettings") -> str:
    """What every stage's result depends on: the settings (less where they are written and how many
    threads compute them), the two checkpoints' digests and :data:`MEASUREMENT_VERSION`."""
    from fcas.models.checkpoint import checkpoint_digest, config_hash

    d = {k: v for k, v in asdict(s).items() if k not in ("work", "results", "plots", "threads", "stop_after")}
    digests = {}
    for name in ("checkpoint", "mask_only_checkpoint"):
        uri = getattr(s, name)
        try:
            digests[name] = checkpoint_digest(uri)
        except (OSError, ValueError):
            digests[name] = None   # a missing checkpoint fails in the stage that loads it
    return config_hash({"settings": json_safe(d), "digests": digests, "version": MEASUREMENT_VERSION})


def _log_event(work: str, row: dict) -> None:
    uri = storage.join(work, STAGE_LOG)
    old = storage.read_bytes(uri).decode() if storage.exists(uri) else ""
    storage.atomic_write_bytes(uri, (old + json.dumps(row, sort_keys=True) + "\n").encode())


def read_stage_log(work: str) -> list[dict]:
    uri = storage.join(work, STAGE_LOG)
    if not storage.exists(uri):
        return []
    return [json.loads(x) for x in storage.read_bytes(uri).decode().splitlines() if x.strip()]


def _stage(work: str, name: str, fn: Callable[[], dict], key: str | None = None, clean: str | None = None) -> dict:
    """Run ``fn`` once: its result (with ``seconds``) is kept as ``<work>/stages/<name>.json``.

    ``key`` names what the result depends on (:func:`stage_key`: settings, checkpoint digests, the
    measurement code's version); a kept result with another key is stale and is computed again,
    after removing ``clean`` (the stage's own output folder, which would otherwise be resumed).
    """
    uri = storage.join(work, "stages", f"{name}.json")
    if storage.exists(uri):
        rec = json.loads(storage.read_bytes(uri))
        if rec.get("key") == key:
            _log_event(work, {"stage": name, "event": "cached", "seconds": 0.0, "at": time.time()})
            log.info("reproduce: stage %s cached (%.1f s when it ran)", name, rec["seconds"])
            return rec
        _log_event(work, {"stage": name, "event": "stale", "seconds": 0.0, "at": time.time()})
        log.info("reproduce: stage %s was computed with other settings or checkpoints; running it again", name)
        if clean and storage.exists(clean):
            storage.remove(clean, recursive=True)
    log.info("reproduce: stage %s ...", name)
    t0 = time.perf_counter()
    result = fn()
    rec = {"stage": name, "seconds": round(time.perf_counter() - t0, 2), "key": key, "result": json_safe(result)}
    storage.atomic_write_bytes(uri, json.dumps(rec, indent=1).encode())
    _log_event(work, {"stage": name, "event": "ran", "seconds": rec["seconds"], "at": time.time()})
    log.info("reproduce: stage %s done in %.1f s", name, rec["seconds"])
    return rec


def _ms(values: Sequence[float | None]) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if not v.size:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


# ---- Table 1: held-out pairs ------------------------------------------------------------------


@torch.no_grad()
def sample_held_out_pairs(checkpoint: str, cases, pairs: int, steps: int, seed: int) -> list[np.ndarray]:
    """Direction B@A on pairs ``(i, i+1 mod N)`` of ``cases`` (:class:`fcas.diffusion.data.CaseArrays`):
    ``I_A`` sampled from ``(M_A, M_B, I_B)`` (the mask-only checkpoint ignores ``M_B``/``I_B``) with
    DDIM; pair ``i``'s initial noise comes from ``rng([seed, i])``, the same for every checkpoint.

    Returns:
        ``pairs`` volumes ``(X, Y, Z)`` float32 in [0, 1].
    """
    from fcas.diffusion.conditioning import build_c_raw
    from fcas.diffusion.sampling import decode_latent, sample
    from fcas.models.bundle import load_tcdm

    bundle = load_tcdm(checkpoint)
    cond = bundle.condition
    out = []
    for i in range(pairs):
        a, b = i % len(cases), (i + 1) % len(cases)
        c = build_c_raw(cases.labels[a:a + 1], cases.labels[b:b + 1], cases.images[b:b + 1], cond.label_schema,
                        cond.encoding, cond.mask_only)
        g = torch.Generator().manual_seed(int(np.random.default_rng([seed, i]).integers(2**62)))
        res = sample(bundle, c, g, steps=steps, scheduler="ddim")
        img = decode_latent(bundle.vae, res.latent, bundle.scale_factor).clamp(0, 1)
        out.append(img[0, 0].numpy())
    return out


def table1_seed(s: ReproduceSettings, seed: int, test, floor_set) -> dict:
    """SSIM / RMSE / FID of both checkpoints on the held-out pairs for one seed (+ the real-vs-real FID floor).

    SSIM and RMSE "under the same mask" (the paper's §4): over the cardiac voxels of the reference mask M_A
    (the figures named ``ssim`` / ``rmse``), and over the whole volume beside them (``*_whole``), where
    the surroundings of A, which neither model is given, dominate.
    """
    from fcas.evaluation import evaluate_pairs
    from fcas.labels import load_schema
    from fcas.metrics.fid import VAEEncoderFeatures, fid

    feats = VAEEncoderFeatures.from_checkpoint(s.checkpoint, resize=s.fid_resize)
    idx = [i % len(test) for i in range(s.pairs)]
    targets = [test.images[i, 0].numpy() for i in idx]
    schema = load_schema(s.schema)
    masks = [np.isin(test.labels[i].numpy(), schema.cardiac_ids) for i in idx]
    out: dict[str, Any] = {"seed": seed, "pairs": s.pairs, "steps": s.table1_steps, "region": "cardiac voxels of M_A"}
    for name, ck in (("template", s.checkpoint), ("mask_only", s.mask_only_checkpoint)):
        t0 = time.perf_counter()
        imgs = sample_held_out_pairs(ck, test, s.pairs, s.table1_steps, seed)
        r = evaluate_pairs(imgs, targets, masks, feats)
        w = evaluate_pairs(imgs, targets, None, None)
        out[name] = {k: r[k] for k in ("ssim_mean", "ssim_sd", "rmse_mean", "rmse_sd", "fid", "ssim", "rmse")}
        out[name].update({f"{k}_whole": w[k] for k in ("ssim_mean", "rmse_mean")})
        out[name]["seconds_per_sample"] = (time.perf_counter() - t0) / s.pairs
        out["features"] = r["features"]
    enc = lambda vols: torch.stack([feats(torch.as_tensor(v)[None, None])[0] for v in vols])  # noqa: E731
    out["fid_floor"] = fid(enc(targets), enc([floor_set.images[i, 0].numpy() for i in range(len(floor_set))]))
    out["vae_reconstruction"] = vae_reconstruction(s.checkpoint, targets, masks)
    return out


def vae_reconstruction(checkpoint: str, targets, masks=None) -> dict:
    """SSIM / RMSE of the checkpoint's own VAE reconstructing ``targets`` (encode, decode) over ``masks``
    (and over the whole volume, ``*_whole``): the ceiling a sample decoded by that VAE can reach,
    reported beside the pair figures."""
    from fcas.metrics.image import rmse, ssim
    from fcas.models.bundle import load_tcdm
    from fcas.models.vae import vae_decode, vae_encode

    bundle = load_tcdm(checkpoint)
    vae = bundle.vae.float()
    masks = [None] * len(targets) if masks is None else list(masks)
    ss, rs, sw, rw = [], [], [], []
    with torch.no_grad():
        for t, m in zip(targets, masks):
            x = torch.as_tensor(t, dtype=torch.float32)[None, None]
            r = vae_decode(vae, vae_encode(vae, x)).clamp(0, 1)[0, 0]
            ss.append(ssim(r, x[0, 0], m))
            rs.append(rmse(r, x[0, 0], m))
            sw.append(ssim(r, x[0, 0]))
            rw.append(rmse(r, x[0, 0]))
    return {"ssim_mean": float(np.mean(ss)), "rmse_mean": float(np.mean(rs)),
            "ssim_mean_whole": float(np.mean(sw)), "rmse_mean_whole": float(np.mean(rw))}


# ---- Tables 3 and 4: segmentation -----------------------------------------------------------


def _cal_settings(s: ReproduceSettings, arm: str, seed: int, syn: str | None, out: str):
    from fcas.cal.training import CALSettings

    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; use one of {ARMS}")
    if arm == "real_only" and s.val_every:   # from scratch until the validation Dice stops improving
        train = {"pretrain_steps": 0, "finetune_steps": s.finetune_steps, "finetune_lr": s.lr}
    elif arm == "real_only":   # the same number of gradient steps, all on the real cases, from scratch
        train = {"pretrain_steps": 0, "finetune_steps": s.pretrain_steps + s.finetune_steps, "finetune_lr": s.lr}
    else:
        train = {"pretrain_steps": s.pretrain_steps, "finetune_steps": s.finetune_steps, "loss": arm,
                 "finetune_lr": s.finetune_lr}
    train.update(batch_size=s.batch_size, lr=s.lr, seed=seed, crop=s.crop, keep_checkpoints=1,
                 checkpoint_every=max(1, s.pretrain_steps + s.finetune_steps))
    if s.val_every:
        train.update(val=s.val_source, val_every=s.val_every, patience=s.patience)
    return CALSettings.from_dict({"syn": syn if arm != "real_only" else None, "real": s.train_source, "real_split": None,
                                  "out": out, "shape": s.shape, "spacing": s.spacing, "preset": s.preset,
                                  "schema": s.schema, "net": dict(s.segnet), "augment": dict(s.augment), "train": train})


def train_and_evaluate_seg(s: ReproduceSettings, arm: str, seed: int, syn: str | None, train_set, test) -> dict:
    """Train one arm with :func:`fcas.cal.training.train_cal_loop` (Ray-free) and score it on ``test``.

    Returns:
        ``{"train": loop summary, "eval": segmentation summary (per-class Dice / RDice), "curve": [...]}``.
    """
    from fcas.cal.data import class_lut
    from fcas.cal.predict import load_segnet, predict_classes
    from fcas.cal.training import read_metrics, train_cal_loop
    from fcas.evaluation import evaluate_segmentation, segmentation_summary
    from fcas.labels import load_schema

    out = storage.join(s.work, "seg", arm, f"seed{seed}")
    settings = _cal_settings(s, arm, seed, syn, out)
    summary = train_cal_loop(settings, finetune=train_set, progress=False)
    net, config = load_segnet(summary.get("best_checkpoint") or summary["latest_checkpoint"])
    lut = class_lut(s.schema)
    to_schema = np.zeros(int(lut.max()) + 1, dtype=np.uint8)
    for sid, k in enumerate(lut):
        if k:
            to_schema[k] = sid
    preds, labels = {}, {}
    for i, cid in enumerate(test.case_ids):
        cls = predict_classes(net, test.images[i:i + 1], config["window"])[0, 0].numpy()
        preds[cid], labels[cid] = to_schema[cls], test.labels[i].numpy()
    schema = load_schema(s.schema)
    rows = evaluate_segmentation(preds, labels, schema, radius=s.rdice_radius)
    ev = segmentation_summary(rows, s.rdice_radius)
    ev.pop("per_case", None)
    curve = [{"step": r["step"], "stage": r["stage"], "loss": r["loss"]} for r in read_metrics(out)]
    val = [{"step": r["step"], "val_dice": r["val_dice"]} for r in summary.pop("validation", [])]
    best = max(val, key=lambda r: r["val_dice"]) if val else None
    return {"arm": arm, "seed": seed, "train": summary, "eval": ev, "curve": curve, "val_curve": val,
            "best_step": best["step"] if best else None}


# ---- orchestration --------------------------------------------------------------------------


def run_reproduce(s: ReproduceSettings, runners: Runners, config: Mapping[str, Any] | None = None) -> dict:
    """Run (or resume) every stage and write the report; returns ``{"stages": {...}, "results": uri}``."""
    from fcas.diffusion.data import load_cases

    torch.set_num_threads(max(1, int(s.threads)))
    storage.makedirs(s.work)
    _log_event(s.work, {"stage": "run", "event": "start", "seconds": 0.0, "at": time.time()})
    stages: dict[str, dict] = {}
    lib_out = storage.join(s.work, "library")

    def data() -> dict:
        if s.library:
            return {"library": s.library, "library_summary": {"given": s.library},
                    "train_source": s.train_source, "test_source": s.test_source}
        summary = runners.prepare(source=f"phantom:{s.library_n}", out=lib_out, shape=s.shape, spacing=s.spacing,
                                  splits=(("template", 0.25), ("reference", 0.75)), seed=0)
        return {"library": storage.join(lib_out, "cases.parquet"), "library_summary": summary,
                "train_source": s.train_source, "test_source": s.test_source}

    key = stage_key(s)
    stages["data"] = _stage(s.work, "data", data, key, clean=lib_out)
    cache: dict[str, Any] = {}
    todo = ("table1", "synthesis", "seg")
    if s.stop_after in todo[:-1] or s.stop_after == "data":
        todo = todo[:todo.index(s.stop_after) + 1] if s.stop_after != "data" else ()

    def cases(which: str):
        if which not in cache:
            src = {"train": s.train_source, "test": s.test_source, "seg_test": s.seg_test_source,
                   "floor": f"phantom:{s.pairs}@{s.real_offset + s.n_train + s.n_test}"}[which]
            cache[which] = load_cases(src, s.shape, s.spacing)
        return cache[which]

    for seed in s.seeds if "table1" in todo else ():
        stages[f"table1_seed{seed}"] = _stage(s.work, f"table1_seed{seed}",
                                              lambda seed=seed: table1_seed(s, seed, cases("test"), cases("floor")), key)
    if "table1" in todo:
        from fcas.evaluation.template_oracles import template_information

        test_seeds = range(s.real_offset + s.n_train, s.real_offset + s.n_train + s.n_test)
        mean_seeds = range(s.real_offset + 9000, s.real_offset + 9000 + s.oracle_mean_n)
        stages["table1_oracles"] = _stage(s.work, "table1_oracles", lambda: template_information(
            test_seeds, s.shape, s.spacing, mean_seeds), key)
    syn_out = storage.join(s.work, "synthesis")
    if "synthesis" in todo:
        stages["synthesis"] = _stage(s.work, "synthesis", lambda: runners.synthesize(
            n=s.syn_n, out=syn_out, checkpoint=s.checkpoint, templates=stages["data"]["result"]["library"],
            run_seed=s.syn_seed, steps=s.syn_steps, ssv_every=s.ssv_every, shape=s.shape, spacing=s.spacing,
            sampler_actors=s.sampler_actors, ssv_mode=s.ssv_mode, ssv_start=s.ssv_start,
            sampler_threads=max(1, s.threads // max(1, s.sampler_actors))), key, clean=syn_out)

    def train_set():
        if "ft" not in cache:
            from fcas.cal.data import load_finetune_set

            cache["ft"] = load_finetune_set(s.train_source, s.shape, s.spacing, None, s.schema)
        return cache["ft"]

    for seed in s.seeds if "seg" in todo else ():
        for arm in ARMS:
            name = f"seg_{arm}_seed{seed}"
            stages[name] = _stage(s.work, name, lambda arm=arm, seed=seed: train_and_evaluate_seg(
                s, arm, seed, syn_out, train_set(), cases("seg_test")), key, clean=storage.join(s.work, "seg", arm, f"seed{seed}"))
    uri = render_results(s, stages, config or {})
    _log_event(s.work, {"stage": "run", "event": "end", "seconds": 0.0, "at": time.time()})
    return {"stages": {k: v["seconds"] for k, v in stages.items()}, "results": uri}


# ---- report ---------------------------------------------------------------------------------


def _pm(m: float, sd: float, digits: int = 3) -> str:
    if not math.isfinite(m):
        return "–"
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def _verdict(better: float, worse: float, sd_b: float, sd_w: float, higher_is_better: bool = True) -> str:
    d = (better - worse) if higher_is_better else (worse - better)
    if not (math.isfinite(d) and math.isfinite(sd_b) and math.isfinite(sd_w)):
        return "not measurable"
    spread = max(sd_b, sd_w)
    if d > spread:
        return "reproduced (difference larger than the seed spread)"
    if d > 0:
        return "same direction, within the seed spread (not conclusive)"
    if -d > spread:
        return "NOT reproduced (the opposite, beyond the seed spread)"
    return "not reproduced (opposite sign, within the seed spread)"


def _num(x) -> float:
    return math.nan if x is None else float(x)


def _seg_stats(stages: Mapping[str, dict], arm: str, seeds, coronary: str) -> dict:
    evs = [stages[f"seg_{arm}_seed{k}"]["result"]["eval"] for k in seeds]
    pc = lambda e, n, key: (e["per_class"].get(n) or {}).get(key)  # noqa: E731
    names = list(evs[0]["per_class"])
    subs = [n for n in names if n != coronary]
    out = {"mean_dice": _ms([e["mean_dice"] for e in evs]), "mean_rdice": _ms([e["mean_rdice"] for e in evs]),
           "sub_dice": _ms([float(np.nanmean([_num(pc(e, n, "dice_mean")) for n in subs])) for e in evs]),
           "cor_dice": _ms([pc(e, coronary, "dice_mean") for e in evs]),
           "cor_rdice": _ms([pc(e, coronary, "rdice_mean") for e in evs]),
           "per_class": {n: (_ms([pc(e, n, "dice_mean") for e in evs]), _ms([pc(e, n, "rdice_mean") for e in evs]))
                         for n in names}}
    return out


def _png(fig) -> bytes:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _plot_table1(t1: dict) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.2), dpi=100, layout="tight")
    for j, (key, label) in enumerate((("ssim", "SSIM (higher better)"), ("rmse", "RMSE (lower better)"),
                                      ("fid", "FID, VAE-encoder features (lower better)"))):
        ax = fig.add_subplot(1, 3, j + 1)
        for x, m in enumerate(("template", "mask_only")):
            vals = np.asarray([np.nan if v is None else v for v in t1[m][key]], dtype=float)
            ax.bar(x, np.nanmean(vals), yerr=np.nanstd(vals, ddof=1) if len(vals) > 1 else 0, capsize=4,
                   color=("tab:blue", "tab:orange")[x])
            ax.plot([x] * len(vals), vals, "k.", ms=4)
        ax.set_xticks([0, 1], ["template-guided", "mask-only"])
        ax.set_title(label, fontsize=9)
    return _png(fig)


def _plot_seg(s: ReproduceSettings, seg: dict, stages: Mapping[str, dict]) -> dict[str, bytes]:
    from matplotlib.figure import Figure

    names = list(seg["real_only"]["per_class"])
    fig = Figure(figsize=(11, 3.6), dpi=100, layout="tight")
    ax = fig.add_subplot(1, 1, 1)
    w = 0.27
    for j, arm in enumerate(ARMS):
        m = [seg[arm]["per_class"][n][0][0] for n in names]
        sd = [seg[arm]["per_class"][n][0][1] for n in names]
        ax.bar(np.arange(len(names)) + (j - 1) * w, m, w, yerr=sd, capsize=2, label=arm)
    ax.set_xticks(np.arange(len(names)), names, rotation=20, fontsize=8)
    ax.set_ylabel("Dice (mean ± sd over seeds)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    plots = {"dice_per_class.png": _png(fig)}
    fig = Figure(figsize=(10, 3.2), dpi=100, layout="tight")
    for j, arm in enumerate(ARMS):
        ax = fig.add_subplot(1, 3, j + 1)
        for seed in s.seeds:
            c = stages[f"seg_{arm}_seed{seed}"]["result"]["curve"]
            ax.plot([r["step"] for r in c], [r["loss"] for r in c], lw=0.8, label=f"seed {seed}")
        if arm != "real_only":
            ax.axvline(s.pretrain_steps + 0.5, color="k", lw=0.6, ls="--")
        ax.set_title(f"{arm} (loss per step)", fontsize=9)
        if s.val_every:
            ax2 = ax.twinx()
            for seed in s.seeds:
                v = stages[f"seg_{arm}_seed{seed}"]["result"].get("val_curve") or []
                ax2.plot([r["step"] for r in v], [r["val_dice"] for r in v], "o-", ms=2, lw=1.2)
            ax2.set_ylim(0, 1)
            ax2.set_ylabel("validation mean Dice (dots)", fontsize=8)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    plots["learning_curves.png"] = _png(fig)
    return plots


def _table1_md(s: ReproduceSettings, stages: Mapping[str, dict], rel: str) -> tuple[list[str], dict, list[str]]:
    L = ["## Table 1 direction: template-guided vs mask-only TCDM (held-out pairs)", ""]
    if not all(f"table1_seed{k}" in stages for k in s.seeds):
        return L + ["Not run in this invocation (`stop_after`); no figures.", ""], {}, []
    t1r = [stages[f"table1_seed{k}"]["result"] for k in s.seeds]
    t1 = {m: {k: [r[m][f"{k}_mean" if k != "fid" else "fid"] for r in t1r] for k in ("ssim", "rmse", "fid")}
          for m in ("template", "mask_only")}
    floor = _ms([r["fid_floor"] for r in t1r])
    sps = _ms([r[m]["seconds_per_sample"] for r in t1r for m in ("template", "mask_only")])
    L += [f"{s.pairs} held-out pairs (A, B) = (i, i+1 mod {s.n_test}) of the test phantoms ({s.test_source}), direction "
          f"B@A, DDIM {s.table1_steps} steps ({sps[0]:.1f} s per sample here); the seed changes the initial noise, both "
          "models get the same noise. SSIM and RMSE on the [0, 1] scale (HU/2000) against the true I_A \"under the same "
          "mask\" as the paper computes them: over the cardiac voxels of M_A (the SSIM window still sees their "
          "neighbourhood); the whole-volume figures are in the second table (A's surroundings, which neither model "
          "is given, dominate them). FID between the sampled set and the true I_A set on features of the project's own VAE encoder "
          f"(no external weights): {t1r[0]['features']}. FID on {s.pairs} volumes is a small-sample figure; the "
          f"real-vs-real floor (the same targets against {s.pairs} other real phantoms) is {_pm(*floor[:2], 2)}. "
          f"Checkpoints: `{s.checkpoint}` and `{s.mask_only_checkpoint}` (trained with the same budget). "
          "LPIPS is not reported (no backbone weights on this machine).", "",
          "| model | SSIM ↑ | RMSE ↓ | FID ↓ |", "|---|---|---|---|"]
    for m, label in (("template", "template-guided (FCaS)"), ("mask_only", "mask-only (ablation)")):
        L.append(f"| {label} | {_pm(*_ms(t1[m]['ssim'])[:2])} | {_pm(*_ms(t1[m]['rmse'])[:2])} | "
                 f"{_pm(*_ms(t1[m]['fid'])[:2], 2)} |")
    recon = [r.get("vae_reconstruction") for r in t1r]
    if all(recon):
        vs, vr = _ms([r["ssim_mean"] for r in recon]), _ms([r["rmse_mean"] for r in recon])
        ts = _ms(t1["template"]["ssim"])
        L.append(f"| VAE reconstruction of I_A (the ceiling) | {_pm(*vs[:2])} | {_pm(*vr[:2])} | – |")
        L += ["", f"Gap of the template-guided samples to the VAE's own reconstruction: SSIM {vs[0] - ts[0]:+.3f} "
              "(reconstruction minus sample)."]
    if all("ssim_mean_whole" in r["template"] for r in t1r):
        L += ["", "Over the whole volume:", "", "| model | SSIM ↑ | RMSE ↓ |", "|---|---|---|"]
        for m, label in (("template", "template-guided (FCaS)"), ("mask_only", "mask-only (ablation)")):
            L.append(f"| {label} | {_pm(*_ms([r[m]['ssim_mean_whole'] for r in t1r])[:2])} | "
                     f"{_pm(*_ms([r[m]['rmse_mean_whole'] for r in t1r])[:2])} |")
        if all(r and "ssim_mean_whole" in r for r in recon):
            L.append(f"| VAE reconstruction of I_A | {_pm(*_ms([r['ssim_mean_whole'] for r in recon])[:2])} | "
                     f"{_pm(*_ms([r['rmse_mean_whole'] for r in recon])[:2])} |")
    if "table1_oracles" in stages:
        L += [""] + _oracles_md(stages["table1_oracles"]["result"], s)
    L += ["", "Per seed (template / mask-only): " + "; ".join(
        f"seed {r['seed']}: SSIM {r['template']['ssim_mean']:.3f} / {r['mask_only']['ssim_mean']:.3f}, "
        f"RMSE {r['template']['rmse_mean']:.3f} / {r['mask_only']['rmse_mean']:.3f}" for r in t1r) + ".",
          "", f"![Table 1]({rel}/table1.png)", ""]
    tm = {k: _ms(t1["template"][k]) for k in t1["template"]}
    mm = {k: _ms(t1["mask_only"][k]) for k in t1["mask_only"]}
    V = [f"- Table 1, SSIM template > mask-only: {_verdict(tm['ssim'][0], mm['ssim'][0], tm['ssim'][1], mm['ssim'][1])}.",
         f"- Table 1, RMSE template < mask-only: {_verdict(tm['rmse'][0], mm['rmse'][0], tm['rmse'][1], mm['rmse'][1], False)}.",
         f"- Table 1, FID template < mask-only: {_verdict(tm['fid'][0], mm['fid'][0], tm['fid'][1], mm['fid'][1], False)}."]
    return L, {"table1.png": _plot_table1(t1)}, V


def _oracles_md(o: Mapping[str, Any], s: ReproduceSettings) -> list[str]:
    """What a template can tell about I_A on these phantoms, without any model (template_oracles)."""
    t = {k: _pm(v["mean"], v["sd"]) for k, v in o["table"].items()}
    return ["**What the template can carry here** (model-free oracles on the same "
            f"{o['pairs']} test pairs, `fcas/evaluation/template_oracles.py`, `benchmarks/template_information.py`): "
            f"I_A re-rendered with B's HU table scores SSIM {t['own_hu_of_B']} against I_A under the mask (its own "
            f"noise-free image {t['noise_free']}, noise-free with B's table {t['noise_free_hu_B']}), so B's intensities "
            f"can move the masked SSIM by at most {o['hu_table_effect']:.3f}; over the whole volume, I_A's heart pasted "
            f"into I_B scores {t['A_heart_in_B']} and into the mean of {s.oracle_mean_n} other phantoms "
            f"{t['A_heart_in_mean']} (I_B alone {t['B_image']}): copying the template's surroundings is "
            f"{'worse' if o['surroundings_copy_minus_mean'] < 0 else 'better'} than the population mean a mask-only "
            "model can learn. Phantom cases are drawn independently, so the template carries almost nothing about "
            "I_A that M_A does not: the direction of Table 1 cannot show on them, whatever the models. Real scans of "
            "one site share scanner, protocol and patient position, which is where the paper's template helps; "
            "testing that needs real CT.", ""]


def _seg_md(s: ReproduceSettings, stages: Mapping[str, dict], rel: str, coronary: str) -> tuple[list[str], dict, list[str]]:
    h3 = ["## Table 3 direction: real only vs synthetic pretraining + fine-tuning", ""]
    h4 = ["## Table 4 direction: plain loss vs CAL pretraining (equal budget)", ""]
    if "synthesis" not in stages or not all(f"seg_{a}_seed{k}" in stages for a in ARMS for k in s.seeds):
        na = ["Not run in this invocation (`stop_after`); no figures.", ""]
        return h3 + na + h4 + na, {}, []
    seg = {arm: _seg_stats(stages, arm, s.seeds, coronary) for arm in ARMS}
    syn = stages["synthesis"]["result"]
    n_syn = syn.get("n_written")
    aug = ("MONAI augmentation (affine, intensity, noise; no flips: a mirrored heart swaps left and right classes)"
           if s.augment.get("enabled", True) else "no augmentation")
    L = h3 + [
        f"Segmentation net: MONAI DynUNet {dict(s.segnet) or '(default)'}, batch {s.batch_size}"
        f"{f' of random {s.crop} crops (inference: sliding window of that size)' if s.crop else ''}, {aug}, AdamW. "
        + (_stopping_md(s, stages) if s.val_every else
           f"**Real only**: the {s.n_train} real (phantom) cases, {s.pretrain_steps + s.finetune_steps} steps from scratch "
           f"at lr {s.lr} (as many gradient steps as the pretrained arms). **Real + Syn**: pretrained {s.pretrain_steps} "
           f"steps on the {n_syn} synthetic samples with the CAL loss (Eq. 9), then fine-tuned {s.finetune_steps} steps on "
           f"the same {s.n_train} cases at lr {s.finetune_lr}. ")
        + f"Test: {s.n_test} held-out phantoms ({s.seg_test_source}). " + _domain_md(s)
        + f"Substructures = the 7 non-coronary cardiac classes; RDice radius {s.rdice_radius} voxels.", "",
        "| training | Dice substructures ↑ | Dice coronary ↑ | mean Dice (8 classes) ↑ | mean RDice ↑ | RDice coronary ↑ |",
        "|---|---|---|---|---|---|"]
    for arm, label in (("real_only", f"Real {s.n_train}"), ("cal", f"Real {s.n_train} + Syn {n_syn} (CAL)")):
        g = seg[arm]
        L.append(f"| {label} | {_pm(*g['sub_dice'][:2])} | {_pm(*g['cor_dice'][:2])} | {_pm(*g['mean_dice'][:2])} | "
                 f"{_pm(*g['mean_rdice'][:2])} | {_pm(*g['cor_rdice'][:2])} |")
    L += ["", "Per class (Dice / RDice, mean ± sd over seeds):", "",
          "| class | " + " | ".join(f"{a} Dice | {a} RDice" for a in ARMS) + " |", "|---" * (1 + 2 * len(ARMS)) + "|"]
    for n in seg["real_only"]["per_class"]:
        L.append(f"| {n} | " + " | ".join(f"{_pm(*seg[a]['per_class'][n][0][:2])} | {_pm(*seg[a]['per_class'][n][1][:2])}"
                                          for a in ARMS) + " |")
    L += ["", f"![Dice per class]({rel}/dice_per_class.png)", "", f"![Learning curves]({rel}/learning_curves.png)", ""]
    L += h4 + [
        f"Both pretrained {s.pretrain_steps} steps on the same synthetic run with the same seed, batches and "
        f"augmentation, then fine-tuned identically ({s.finetune_steps} steps); only the pretraining loss differs "
        "(CM-weighted cross-entropy + soft Dice vs unweighted).", "",
        "| pretraining loss | mean Dice ↑ | Dice coronary ↑ | mean RDice ↑ | RDice coronary ↑ |", "|---|---|---|---|---|"]
    for arm, label in (("plain", "plain (Eq. 8)"), ("cal", "CAL (Eq. 9)")):
        g = seg[arm]
        L.append(f"| {label} | {_pm(*g['mean_dice'][:2])} | {_pm(*g['cor_dice'][:2])} | {_pm(*g['mean_rdice'][:2])} | "
                 f"{_pm(*g['cor_rdice'][:2])} |")
    L.append("")
    c, r, p = seg["cal"], seg["real_only"], seg["plain"]
    V = [f"- Table 3, coronary Dice real+syn > real only: {_verdict(c['cor_dice'][0], r['cor_dice'][0], c['cor_dice'][1], r['cor_dice'][1])}.",
         f"- Table 3, substructure Dice real+syn > real only: {_verdict(c['sub_dice'][0], r['sub_dice'][0], c['sub_dice'][1], r['sub_dice'][1])}.",
         f"- Table 4, mean Dice CAL > plain: {_verdict(c['mean_dice'][0], p['mean_dice'][0], c['mean_dice'][1], p['mean_dice'][1])}.",
         f"- Table 4, coronary Dice CAL > plain: {_verdict(c['cor_dice'][0], p['cor_dice'][0], c['cor_dice'][1], p['cor_dice'][1])}."]
    return L, _plot_seg(s, seg, stages), V


def _domain_md(s: ReproduceSettings) -> str:
    if s.real_domain == "standard":
        return ""
    return (f"The real train, validation and test cases are `{s.real_domain}` phantoms (`fcas.phantom`: a late, weak "
            "contrast bolus, 2.8x the noise and a softer kernel), another scanner and protocol than the standard "
            "phantoms of the template library the synthetic images follow: as in the paper's Table 2, the synthetic "
            "data come from one data set and the net is fine-tuned and tested on another. ")


def _stopping_md(s: ReproduceSettings, stages: Mapping[str, dict]) -> str:
    """The convergence criterion and where each arm stopped (early stopping on the validation split)."""
    where = []
    for arm in ARMS:
        steps = [stages[f"seg_{arm}_seed{k}"]["result"].get("best_step") for k in s.seeds]
        where.append(f"{arm} {', '.join('–' if v is None else str(v) for v in steps)}")
    return (f"**Convergence criterion**: every arm fine-tunes on the {s.n_train} real (phantom) cases until the mean "
            f"Dice on {s.n_val} validation phantoms ({s.val_source}), checked every {s.val_every} steps, has not "
            f"improved for {s.patience} checks (at most {s.finetune_steps} fine-tuning steps); the checkpoint with the "
            f"best validation Dice is the one tested. **Real only** starts from scratch at lr {s.lr}; **Real + Syn** "
            f"is first pretrained {s.pretrain_steps} steps on the synthetic samples (CAL loss, Eq. 9, or the plain "
            f"loss for Table 4), then fine-tuned at lr {s.finetune_lr}. Best checkpoint step per seed: "
            + "; ".join(where) + ". ")


def _convergence_note(s: ReproduceSettings, stages: Mapping[str, dict]) -> list[str]:
    """A Limits line saying how far from converged the real-only arm still was (from its loss curve)."""
    curves = [stages[f"seg_real_only_seed{k}"]["result"]["curve"] for k in s.seeds
              if f"seg_real_only_seed{k}" in stages]
    if s.val_every:
        return []
    if not curves or min(len(c) for c in curves) < 20:
        return []
    k = max(5, min(len(c) for c in curves) // 10)
    drops = [1.0 - np.mean([r["loss"] for r in c[-k:]]) / np.mean([r["loss"] for r in c[-2 * k:-k]]) for c in curves]
    return [f"- The segmentation arms are short of convergence at this budget: the real-only loss still fell "
            f"{100 * float(np.mean(drops)):.0f} % (mean over seeds) from its second-last {k} steps to its last {k}. "
            "The Table 3 and 4 verdicts are about this budget, not about converged networks."]


def _loadavg() -> tuple[float, ...]:
    import os

    try:
        return os.getloadavg()
    except OSError:
        return (math.nan,) * 3


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def render_results(s: ReproduceSettings, stages: Mapping[str, dict], config: Mapping[str, Any]) -> str:
    """Write ``s.results`` (markdown) and the PNGs under ``s.plots``; returns the results URI.
    Sections whose stages did not run (``stop_after``) say so instead of showing figures."""
    from fcas.labels import load_schema

    coronary = load_schema(s.schema).names.get(8, "coronary arteries")
    rel = s.plots.rstrip("/").rsplit("/", 1)[-1]
    L1, P1, V1 = _table1_md(s, stages, rel)
    L2, P2, V2 = _seg_md(s, stages, rel, coronary)
    storage.makedirs(s.plots)
    for name, data in {**P1, **P2}.items():
        storage.atomic_write_bytes(storage.join(s.plots, name), data)
    smoke = s.scale != "full"
    L: list[str] = ["# Miniature reproduction on phantoms (`make reproduce`)", ""]
    if smoke:
        L += [f"> **SMOKE SCALE** (`scale={s.scale}`): a few steps and samples to check that every stage runs. "
              "These numbers are NOT the reproduction; run `make reproduce` (scale=full) for that.", ""]
    if s.stop_after:
        L += [f"> **Partial run** (`stop_after={s.stop_after}`): only the stages up to {s.stop_after} ran.", ""]
    L += [f"Generated by `jobs/reproduce.py scale={s.scale}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
          f"({platform.machine()}, torch {torch.__version__}, {s.threads} threads). Preset `{s.preset}` "
          f"({'x'.join(map(str, s.shape))} @ {s.spacing[0]} mm); seeds {list(s.seeds)}; every figure is mean ± sd "
          f"(sample sd, ddof=1) over the seeds. Phantoms stand in for CT: the claims tested are the *directions* of the "
          "paper's tables, not their values.", ""]
    L += L1 + L2
    L += ["## Reading", "",
          "Verdicts are mechanical: a direction counts as reproduced only when the difference of the means exceeds "
          "the larger seed sd.", "", *(V1 + V2 or ["- nothing to read: no table ran."]), ""]
    if smoke:
        L += ["At smoke scale the nets train for a handful of steps: the verdicts above say nothing about the paper.", ""]
    L += ["## Limits of this miniature", "",
          "- Phantoms, not CT: appearance is simple, so absolute SSIM / Dice mean little; only directions are compared.",
          "- One synthesis run is shared by every seed; the seeds vary the Table 1 noise and the segmentation "
          "training (initialisation, batches, augmentation), not the synthetic set.",
          "- The template library is phantoms the demo TCDM was trained on (the paper draws templates from its own "
          "data set); the real train/test phantoms use seeds the TCDM never saw.",
          "- FID uses the project's own VAE encoder on a few volumes (the real-vs-real floor is given beside it); "
          "LPIPS is not computed (no backbone weights).",
          ("- Every arm trains to the early-stopping criterion above; the maximum step count caps it."
           if s.val_every else
           "- Real-only training gets as many gradient steps as pretraining + fine-tuning, not a convergence criterion."),
          *_convergence_note(s, stages), ""]
    syn = stages.get("synthesis", {}).get("result", {})
    L += ["## Configuration", "",
          f"- Synthesis: {syn.get('n_written', 'not run')} samples (`{s.checkpoint}`, DDIM {s.syn_steps} steps, SSV "
          f"{s.ssv_mode} mode every {s.ssv_every} steps from step {int(s.ssv_start * s.syn_steps)}, run seed {s.syn_seed}, template library phantom:{s.library_n} = the "
          "demo TCDM's own training phantoms 0..N-1, split 25 % template / 75 % reference); one run shared by every seed.",
          f"- Real (phantom) data: segmentation train {s.train_source}, test {s.seg_test_source}"
          f"{f', validation {s.val_source}' if s.val_source else ''}; Table 1 pairs {s.test_source} (phantom seeds the "
          "TCDM never saw).",
          "", "```", *(f"{k}: {json.dumps(json_safe(v))}" for k, v in (config or asdict(s)).items()), "```", "",
          "## Stage timings", "",
          "Wall seconds of each stage when it ran (a cached stage keeps the figure of the run that made it). "
          "Load average of the machine when this report was written (1/5/15 min): "
          + " / ".join(f"{v:.1f}" for v in _loadavg()) + " on " + str(_cpus()) + " CPUs.", "",
          "| stage | seconds |", "|---|---|"]
    for name, rec in stages.items():
        L.append(f"| {name} | {rec['seconds']:.1f} |")
    L.append(f"| **total** (cached stages at the cost of the run that made them) | "
             f"{sum(r['seconds'] for r in stages.values()):.1f} |")
    if "/" in s.results:
        storage.makedirs(s.results.rsplit("/", 1)[0])
    storage.atomic_write_bytes(s.results, ("\n".join(L) + "\n").encode())
    return s.results
