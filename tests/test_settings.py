"""fcas.settings.build: one path from a plain config mapping to the frozen settings dataclasses."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import pytest
from omegaconf import OmegaConf

from fcas.cal.data import AugmentConfig
from fcas.cal.net import SegNetConfig
from fcas.training.cal import CALSettings
from fcas.deform.config import MGMConfig
from fcas.deform.params import MGMRanges
from fcas.deform.qc import QCThresholds
from fcas.training.tcdm import TCDMSettings
from fcas.evaluation.report import settings_from_dict as evaluate_settings
from fcas.export.nnunet import settings_from_dict as export_settings
from fcas.models.networks import ModelConfig
from fcas.training.vae import VAESettings
from fcas.reproduction.settings import ReproduceSettings
from fcas.settings import build


@dataclass(frozen=True)
class Inner:
    steps: int = 1
    lr: float = 0.1
    amp: bool = False
    crop: tuple[int, int, int] | None = None
    splits: tuple[str, ...] = ("test",)
    pairs: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    spacing: tuple[float, ...] = (1.0, 1.0, 1.0)
    other: Inner | None = None
    kind: str | tuple[str, ...] = "all"
    extra: Mapping[str, Any] = field(default_factory=dict)
    anything: Any = None


@dataclass(frozen=True)
class Hooked:
    preset: str = "tiny"
    inner: Inner = field(default_factory=Inner)

    @classmethod
    def before_build(cls, d: dict) -> dict:
        return {"preset": "custom", **d}


@dataclass(frozen=True)
class HasHooked:
    hooked: Hooked = field(default_factory=Hooked)


TCDM = {"data": "phantom:3", "out": "x", "shape": [32, 32, 32], "spacing": [4.0, 4.0, 4.0]}


# ---- the builder ----------------------------------------------------------------------------------
def test_nested_build_from_a_plain_dict():
    s = build(Outer, {"name": "a", "inner": {"steps": 3, "lr": 1, "crop": [8, 8, 4], "amp": True},
                      "spacing": [2, 2.5], "other": {"steps": 2}, "extra": {"k": [1, 2]}, "anything": [1]})
    assert s == Outer(name="a", inner=Inner(steps=3, lr=1.0, crop=(8, 8, 4), amp=True), spacing=(2.0, 2.5),
                      other=Inner(steps=2), extra={"k": [1, 2]}, anything=[1])
    assert isinstance(s.inner.lr, float) and isinstance(s.spacing, tuple) and s.extra == {"k": [1, 2]}


def test_nested_build_from_an_omegaconf_dictconfig():
    cfg = OmegaConf.create({"base": 7, "job": {"name": "b", "inner": {"steps": "${base}", "crop": [4, 4, 4],
                                                                      "splits": ["train", "val"]}}})
    s = build(Outer, cfg.job)   # resolved: the interpolation reads the root
    assert s == Outer(name="b", inner=Inner(steps=7, crop=(4, 4, 4), splits=("train", "val")))
    assert build(Inner, cfg.job.inner) == s.inner
    assert build(Outer, {"name": "c", "inner": cfg.job.inner}).inner == s.inner   # a node inside a plain dict


def test_defaults_when_none_and_nested_none():
    assert build(Inner, None) == Inner() == build(Inner, {})
    assert build(Outer, {"name": "a", "inner": None}).inner == Inner()   # a nested dataclass: its defaults
    assert build(Outer, {"name": "a", "other": None}).other is None       # ... unless it may be None


def test_tuples_optionals_and_unions():
    s = build(Inner, {"crop": (1, 2, 3), "splits": "test", "pairs": {"train": 0.5, "test": "0.5"}})
    assert s.crop == (1, 2, 3) and s.splits == ("test",) and s.pairs == (("train", 0.5), ("test", 0.5))
    assert build(Inner, {"crop": None}).crop is None
    assert build(Outer, {"name": "a", "kind": "cardiac"}).kind == "cardiac"
    assert build(Outer, {"name": "a", "kind": ["lv", "rv"]}).kind == ("lv", "rv")
    with pytest.raises(ValueError, match=r"inner\.crop must hold 3 items, got \[1, 2\]"):
        build(Outer, {"name": "a", "inner": {"crop": [1, 2]}})
    with pytest.raises(ValueError, match=r"inner\.crop\[1\] must be an int, got 'x'"):
        build(Outer, {"name": "a", "inner": {"crop": [1, "x", 3]}})
    with pytest.raises(ValueError, match="spacing must be a list, got 2.0"):
        build(Outer, {"name": "a", "spacing": 2.0})


def test_values_are_typed_and_a_wrong_type_names_the_nested_key():
    s = build(Outer, {"name": 2024, "inner": {"steps": "5", "lr": "1e-4", "amp": "true"}})
    assert (s.name, s.inner.steps, s.inner.lr, s.inner.amp) == ("2024", 5, 1e-4, True)
    assert build(Inner, {"steps": 4.0, "amp": 1}) == Inner(steps=4, amp=True)
    bad = [({"steps": "abc"}, "inner.steps must be an int, got 'abc'"), ({"steps": 1.5}, "inner.steps must be an int"),
           ({"steps": True}, "inner.steps must be an int"), ({"lr": "fast"}, "inner.lr must be a number"),
           ({"amp": "maybe"}, "inner.amp must be true or false"), ({"amp": 2}, "inner.amp must be true or false")]
    for inner, match in bad:
        with pytest.raises(ValueError, match=match):
            build(Outer, {"name": "a", "inner": inner})
    with pytest.raises(ValueError, match="name must be a string, got"):
        build(Outer, {"name": ["a"]})
    with pytest.raises(ValueError, match="inner must be a mapping, got 3"):
        build(Outer, {"name": "a", "inner": 3})
    with pytest.raises(ValueError, match=r"cfg\.inner\.steps must be an int"):
        build(Outer, {"name": "a", "inner": {"steps": "x"}}, where="cfg")


def test_unknown_keys_are_refused_with_the_nested_path_and_the_known_ones():
    with pytest.raises(ValueError, match=r"^unknown Outer keys \['nope'\]; known: \['anything', 'extra', "):
        build(Outer, {"name": "a", "nope": 1})
    with pytest.raises(ValueError, match=r"^inner: unknown Inner keys \['stepz'\]; known: .*'steps'"):
        build(Outer, {"name": "a", "inner": {"stepz": 1}})
    with pytest.raises(ValueError, match=r"^job\.other: unknown Inner keys \['x', 'y'\]"):
        build(Outer, {"name": "a", "other": {"y": 1, "x": 2}}, where="job")
    with pytest.raises(ValueError, match=r"^unknown my settings \['nope'\] \(Inner\); known"):
        build(Inner, {"nope": 1}, what="my settings")


def test_ignore_and_missing_required_keys():
    assert build(Outer, {"name": "a", "hydra": {"run": {}}}, ignore=("hydra",)) == Outer(name="a")
    with pytest.raises(ValueError, match="unknown Outer keys"):
        build(Outer, {"name": "a", "hydra": {}})
    with pytest.raises(ValueError, match=r"missing Outer keys \['name'\]"):
        build(Outer, {"inner": {}})
    with pytest.raises(ValueError, match="must be a mapping"):
        build(Inner, [1, 2])
    with pytest.raises(TypeError):
        build(dict, {})


def test_a_class_hook_runs_for_nested_fields_too():
    assert build(Hooked, {}).preset == "custom" and build(Hooked, {"preset": "demo"}).preset == "demo"
    assert build(HasHooked, {"hooked": {"inner": {"steps": 2}}}).hooked == Hooked(preset="custom", inner=Inner(steps=2))
    assert build(HasHooked, {"hooked": None}).hooked.preset == "custom"   # None: read from {}
    assert build(HasHooked, None).hooked.preset == "tiny"                 # missing: the field's default


# ---- the migrated settings keep their readings ------------------------------------------------------------
def test_tcdm_and_vae_settings():
    s = TCDMSettings.from_dict({**TCDM, "model": {"name": "tiny", "vae": {"num_res_blocks": 2}},
                                "train": {"steps": "3", "crop": [16, 16, 16]}, "condition": None})
    assert s.preset == "custom" and s.shape == (32, 32, 32) and s.spacing == (4.0, 4.0, 4.0)
    assert s.model.vae.num_res_blocks == (2, 2, 2) and s.train.steps == 3 and s.train.crop == (16, 16, 16)
    assert TCDMSettings.from_dict({**TCDM, "model": {}}).model.name == "custom"   # nested: ModelConfig's own default
    assert TCDMSettings.from_dict(TCDM).model == ModelConfig(name="custom")
    assert TCDMSettings.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="train.steps must be an int, got 'abc'"):
        TCDMSettings.from_dict({**TCDM, "train": {"steps": "abc"}})
    with pytest.raises(ValueError, match=r"missing TCDMSettings keys \['data'\]"):
        TCDMSettings.from_dict({k: v for k, v in TCDM.items() if k != "data"})
    v = VAESettings.from_dict({**TCDM, "vae": {"channels": [8, 16, 16]}, "train": {"crop": [16, 16, 16]}})
    assert (v.preset, v.model_name, v.train.crop) == ("custom", "custom", (16, 16, 16))
    assert VAESettings.from_dict(v.to_dict()) == v


def test_cal_settings():
    base = {"syn": "", "real": "phantom:2", "out": "x", "shape": [32] * 3, "spacing": [4.0] * 3,
            "train": {"pretrain_steps": 0}, "augment": None}
    s = CALSettings.from_dict(base)
    assert s.syn is None and s.preset == "custom" and s.net.out_channels == 9 and s.augment == AugmentConfig()
    assert CALSettings.from_dict(s.to_dict()) == s


def test_evaluate_export_and_mgm_settings():
    e = evaluate_settings({"splits": "test", "fid_real": ["template"], "fid_resize": [8, 8, 8], "hydra": {}})
    assert (e.splits, e.fid_real, e.fid_resize) == (("test",), ("template",), (8, 8, 8))
    x = export_settings({"out": "o", "run": "r", "cases": "null", "test_splits": None, "train_splits": "train",
                         "dataset_id": "42", "hydra": {"job": {}}})
    assert (x.cases, x.test_splits, x.train_splits, x.dataset_id) == (None, (), ("train",), 42)
    assert export_settings({"out": "o", "cases": "c", "test_splits": ["test", "reference"]}).test_splits == \
        ("test", "reference")
    node = OmegaConf.create({"name": "default", "max_tries": 2, "qc": {"classes": ["left_ventricle"],
                                                                         "adjacency": [["a", "b"]]}})
    m = MGMConfig.from_dict(node)
    assert m.max_tries == 2 and m.qc.classes == ("left_ventricle",) and m.qc.adjacency == (("a", "b"),)
    with pytest.raises(ValueError, match=r"mgm\.ranges\.zeta_mm must hold 2 items"):
        MGMConfig.from_dict({"ranges": {"zeta_mm": [1.0]}})


def test_synthesis_job_refuses_an_unknown_resources_key():
    from hydra import compose, initialize_config_dir

    from fcas.bundled import config_dir
    from fcas.pipeline.jobs import synthesis_job_from_cfg

    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        job = synthesis_job_from_cfg(compose("synthesize", overrides=["out=/x", "resources.sampler_gpus=1"]))
        assert job.resources.sampler_gpus == 1.0 and job.resources.sampler_actors == (1, 1)
        assert job.sampler.ssv_start == 0.5 and job.shape == (64, 64, 64)
        with pytest.raises(ValueError, match=r"resources: unknown Resources keys \['bogus'\]"):
            synthesis_job_from_cfg(compose("synthesize", overrides=["out=/x", "+resources.bogus=1"]))
        with pytest.raises(ValueError, match="sampler.steps must be an int"):
            synthesis_job_from_cfg(compose("synthesize", overrides=["out=/x", "sampler.steps=many"]))


UNKNOWN = [
    ("TCDMSettings", lambda extra: TCDMSettings.from_dict({**TCDM, **extra}), "unknown TCDMSettings keys"),
    ("TCDMSettings.train", lambda extra: TCDMSettings.from_dict({**TCDM, "train": extra}),
     "train: unknown TrainConfig keys"),
    ("VAESettings", lambda extra: VAESettings.from_dict({**TCDM, **extra}), "unknown VAESettings keys"),
    ("VAESettings.vae", lambda extra: VAESettings.from_dict({**TCDM, "vae": extra}), "vae: unknown VAEConfig keys"),
    ("CALSettings", lambda extra: CALSettings.from_dict({"syn": None, "real": "phantom:2", "out": "x",
                                                         "shape": [32] * 3, "spacing": [4.0] * 3,
                                                         "train": {"pretrain_steps": 0}, **extra}),
     "unknown CALSettings keys"),
    ("EvaluateSettings", lambda extra: evaluate_settings(extra), "unknown evaluate settings"),
    ("ExportSettings", lambda extra: export_settings({"out": "o", "run": "r", **extra}), "unknown ExportSettings keys"),
    ("ReproduceSettings", lambda extra: ReproduceSettings.from_dict({"work": "w", **extra}),
     "unknown reproduce settings"),
    ("MGMConfig", lambda extra: MGMConfig.from_dict(extra), "mgm: unknown MGMConfig keys"),
    ("MGMConfig.qc", lambda extra: MGMConfig.from_dict({"qc": extra}), "mgm.qc: unknown QCThresholds keys"),
    ("QCThresholds", lambda extra: QCThresholds.from_dict(extra), "mgm.qc: unknown QCThresholds keys"),
    ("MGMRanges", lambda extra: MGMRanges.from_dict(extra), "mgm.ranges: unknown MGMRanges keys"),
    ("SegNetConfig", lambda extra: SegNetConfig.from_dict(extra), "unknown SegNetConfig keys"),
    ("AugmentConfig", lambda extra: AugmentConfig.from_dict(extra), "unknown AugmentConfig keys"),
    ("ModelConfig", lambda extra: ModelConfig.from_dict(extra), "model: unknown ModelConfig keys"),
    ("ModelConfig.unet", lambda extra: ModelConfig.from_dict({"unet": extra}), "model.unet: unknown UNetConfig keys"),
]


@pytest.mark.parametrize("entry, match", [pytest.param(e, m, id=i) for i, e, m in UNKNOWN])
def test_each_settings_class_refuses_an_unknown_key(entry, match):
    entry({})   # the same call without it builds
    with pytest.raises(ValueError, match=match + r" \['bogus_key'\].*; known: \["):
        entry({"bogus_key": 1})
