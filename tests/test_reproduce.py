"""make reproduce: the smoke scale end to end on local Ray (tiny preset, the session's tiny checkpoint), stage
caching and resume, the mechanical verdicts, held-out pair sampling determinism."""
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from fcas.reproduction import ARMS, ReproduceSettings, read_stage_log, run_stage, sample_held_out_pairs, verdict

ROOT = Path(__file__).resolve().parent.parent
NUM = re.compile(r"-?\d+\.\d+ ± \d+\.\d+")


def _smoke_cfg(tmp_path, checkpoint, library=None):
    cfg = OmegaConf.load(ROOT / "configs" / "reproduce.yaml")
    cfg.pop("defaults")
    cfg.pop("hydra")
    cfg.scale = "smoke"
    cfg.work = str(tmp_path / "work")
    cfg.results = str(tmp_path / "docs" / "results.md")
    cfg.plots = str(tmp_path / "docs" / "results")
    sm = cfg.scales.smoke   # the tiny preset and the session's tiny TCDM (the demo one costs minutes on 2 CPUs)
    sm.preset, sm.shape, sm.spacing = "tiny", [32, 32, 32], [4.0, 4.0, 4.0]
    sm.checkpoint = sm.mask_only_checkpoint = checkpoint
    sm.fid_resize = None
    sm.seeds = [0, 1]      # two seeds still give mean ± sd; the third only costs time on the shared 2 cores
    sm.library = library   # the session's prepared tiny library (the prepare job itself is tested elsewhere)
    return cfg


def _section(md: str, title: str) -> str:
    start = md.index(title)
    nxt = md.find("\n## ", start + 1)
    return md[start: nxt if nxt > 0 else len(md)]


def test_smoke_end_to_end_then_rerun_resumes(ray_local, tiny_checkpoint, tiny_templates, tmp_path):
    from fcas.pipeline.reproduce import run

    cfg = _smoke_cfg(tmp_path, tiny_checkpoint, tiny_templates)
    t0 = time.perf_counter()
    out = run(cfg)
    first = time.perf_counter() - t0
    md = Path(out["results"]).read_text()
    assert "SMOKE SCALE" in md
    for title, rows in (("## Table 1", 2), ("## Table 3", 2), ("## Table 4", 2)):
        sec = _section(md, title)
        table = [line for line in sec.splitlines() if line.startswith("| ") and NUM.search(line)]
        assert len(table) >= rows, f"{title}: expected {rows} rows with numbers, got:\n{sec}"
    for png in ("table1.png", "dice_per_class.png", "learning_curves.png"):
        assert (tmp_path / "docs" / "results" / png).read_bytes()[:4] == b"\x89PNG"
    assert "](results/table1.png)" in md

    work = tmp_path / "work"
    seeds = list(cfg.scales.smoke.seeds)
    names = {"data", "synthesis", "table1_oracles", *(f"table1_seed{k}" for k in seeds), *(f"seg_{a}_seed{k}" for a in ARMS for k in seeds)}
    assert {p.stem for p in (work / "stages").glob("*.json")} == names
    ran = {r["stage"] for r in read_stage_log(str(work)) if r["event"] == "ran"}
    assert ran == names
    # figures are in range
    t1 = json.loads((work / "stages" / f"table1_seed{seeds[0]}.json").read_text())["result"]
    for m in ("template", "mask_only"):
        assert -1.0 <= t1[m]["ssim_mean"] <= 1.0 and 0.0 <= t1[m]["rmse_mean"] <= 1.0 and t1[m]["fid"] >= 0.0
    # Table 1 is scored under the cardiac mask of M_A, with the whole-volume figures beside it
    assert t1["region"] == "cardiac voxels of M_A"
    assert 0.0 <= t1["template"]["rmse_mean_whole"] <= 1.0
    assert t1["template"]["ssim_mean"] != t1["template"]["ssim_mean_whole"]
    assert {"ssim_mean", "ssim_mean_whole", "rmse_mean", "rmse_mean_whole"} <= set(t1["vae_reconstruction"])
    assert "Over the whole volume:" in _section(md, "## Table 1")
    # the zeroed-outside reading: it lifts every figure over the plain masked one (the shared zero border)
    assert t1["template"]["ssim_mean"] < t1["template"]["ssim_zeroed_mean"] <= 1.0
    assert t1["vae_reconstruction"]["ssim_mean"] < t1["vae_reconstruction"]["ssim_zeroed_mean"] <= 1.0
    assert "both images set to 0 outside M_A" in _section(md, "## Table 1")
    # the model-free oracles of what a template can carry, on the same test pairs
    orc = json.loads((work / "stages" / "table1_oracles.json").read_text())["result"]
    assert orc["pairs"] == cfg.scales.smoke.n_test and len(orc["table"]["noise_free"]["per_pair"]) == orc["pairs"]
    assert all(0.0 < v["mean"] <= 1.0 for v in orc["table"].values())
    assert "What the template can carry here" in _section(md, "## Table 1")
    # sites (smoke: 2): the template is the target's site mate, and the site-mean oracle is reported
    assert orc["site_size"] == cfg.scales.smoke.site_size and "A_heart_in_site_mean" in orc["table"]
    assert "B the next phantom of A's site" in _section(md, "## Table 1")
    # the sub-volume FID: 64 rows per volume, so two volumes already estimate it
    assert t1["template"]["fid_patches"] >= 0.0 and t1["fid_patches_floor"] >= 0.0
    assert "sub-volume FID" in _section(md, "## Table 1")
    # an exact heart in unknown surroundings is far from 1 under the mask, worse with I_B's than with the mean
    region = orc["table"]["A_heart_in_mean_region"]["mean"]
    assert orc["table"]["A_heart_in_B_region"]["mean"] < region < orc["table"]["noise_free"]["mean"]
    assert "even I_A's exact heart" in _section(md, "## Table 1")
    # both arms used the same checkpoint here, with the same noise per (seed, pair): identical images
    assert t1["template"]["ssim"] == t1["mask_only"]["ssim"]
    seg = json.loads((work / "stages" / f"seg_cal_seed{seeds[0]}.json").read_text())["result"]
    assert seg["train"]["final_step"] == cfg.scales.smoke.pretrain_steps + cfg.scales.smoke.finetune_steps
    assert 0.0 <= seg["eval"]["mean_dice"] <= 1.0 and len(seg["eval"]["per_class"]) == 8
    assert {r["stage"] for r in seg["curve"]} == {"pretrain", "finetune"}
    syn = json.loads((work / "stages" / "synthesis.json").read_text())["result"]
    assert syn["n_written"] == cfg.scales.smoke.syn_n

    # rerun: every stage is read from its cache, nothing runs again, the report is rewritten
    n_log = len(read_stage_log(str(work)))
    Path(out["results"]).unlink()
    t0 = time.perf_counter()
    run(cfg)
    second = time.perf_counter() - t0
    new = read_stage_log(str(work))[n_log:]
    assert {r["stage"] for r in new if r["event"] == "cached"} == names
    assert not [r for r in new if r["event"] == "ran"]
    assert Path(out["results"]).read_text().count("±") == md.count("±")
    assert second < first
    print(f"reproduce smoke: first run {first:.1f} s, cached rerun {second:.1f} s; stages {out['stages']}")

    # a report written while the run goes on: Tables 3 and 4 over the seeds whose every arm finished
    from fcas.pipeline.reproduce import settings_from_cfg
    from fcas.reproduction import render_results

    settings, used = settings_from_cfg(cfg)
    stages = {p.stem: json.loads(p.read_text()) for p in (work / "stages").glob("*.json")}
    stages.pop(f"seg_plain_seed{seeds[-1]}")
    partial = Path(render_results(settings, stages, used)).read_text()
    sec = _section(partial, "## Table 3")
    assert f"**Partial**: seed(s) {seeds[:-1]} of {seeds}" in sec and "Table 4, mean Dice CAL > plain: the " in partial


def test_stage_cache_runs_once(tmp_path):
    calls = []
    fn = lambda: calls.append(1) or {"x": np.float32(0.5), "nan": float("nan")}  # noqa: E731
    a = run_stage(str(tmp_path), "s", fn)
    b = run_stage(str(tmp_path), "s", fn)
    assert calls == [1]
    assert a["result"] == b["result"] == {"x": 0.5, "nan": None}
    assert [r["event"] for r in read_stage_log(str(tmp_path))] == ["ran", "cached"]
    # another key (other settings or checkpoints): stale, computed again after removing its folder
    own = tmp_path / "own"
    own.mkdir()
    (own / "old.txt").write_text("x")
    c = run_stage(str(tmp_path), "s", fn, key="k2", clean=str(own))
    assert calls == [1, 1] and c["key"] == "k2" and not own.exists()
    assert run_stage(str(tmp_path), "s", fn, key="k2")["key"] == "k2" and calls == [1, 1]
    assert [r["event"] for r in read_stage_log(str(tmp_path))][2:] == ["stale", "ran", "cached"]


def test_stage_key_follows_settings_and_checkpoints(tiny_checkpoint, tmp_path):
    """Each stage's key moves with what it depends on and only that: a segmentation setting reruns the arms
    only, a new mask-only checkpoint Table 1 only, a synthesis setting synthesis and the arms."""
    import dataclasses
    import shutil

    from fcas.reproduction import ReproduceSettings, stage_key
    from fcas.reproduction.stages import NOT_A_DEPENDENCY, STAGE_DEPENDENCIES

    base = dict(work=str(tmp_path / "w"), checkpoint=tiny_checkpoint, mask_only_checkpoint=tiny_checkpoint)
    stages = ("data", "table1", "synthesis", "seg")
    keys = lambda **kw: {st: stage_key(ReproduceSettings(**{**base, **kw}), st) for st in stages}  # noqa: E731
    k = keys()
    assert len(set(k.values())) == 4
    changed = lambda **kw: {st for st, v in keys(**kw).items() if v != k[st]}  # noqa: E731
    assert changed(work=str(tmp_path / "elsewhere"), threads=7, seeds=(5,)) == set()
    assert changed(pairs=3) == {"table1", "seg"}                 # the validation seeds follow the test seeds
    assert changed(patience=9) == changed(seg_amp_dtype="bfloat16") == {"seg"}
    assert changed(syn_n=7) == {"synthesis", "seg"}
    assert changed(library_n=5) == set(stages)
    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoint, other)
    (other / "checkpoint.json").write_text((other / "checkpoint.json").read_text() + "\n")   # another digest
    assert changed(mask_only_checkpoint=str(other)) == {"table1"}
    assert changed(checkpoint=str(other)) == {"table1", "synthesis", "seg"}
    # every setting is some stage's dependency or declared none: a new field cannot reuse a stale result
    listed = set(NOT_A_DEPENDENCY).union(*STAGE_DEPENDENCIES.values())
    assert {f.name for f in dataclasses.fields(ReproduceSettings)} == listed
    with pytest.raises(ValueError, match="unknown stage 'tables'"):
        stage_key(ReproduceSettings(**base), "tables")


@pytest.mark.parametrize("better, worse, sd_b, sd_w, higher, start", [
    (0.9, 0.5, 0.1, 0.1, True, "reproduced"),
    (0.55, 0.5, 0.1, 0.1, True, "same direction"),
    (0.5, 0.9, 0.1, 0.1, True, "NOT reproduced"),
    (0.5, 0.55, 0.1, 0.1, True, "not reproduced"),
    (0.1, 0.5, 0.05, 0.05, False, "reproduced"),        # lower is better (RMSE, FID)
    (float("nan"), 0.5, 0.1, 0.1, True, "not measurable"),
])
def test_verdict(better, worse, sd_b, sd_w, higher, start):
    assert verdict(better, worse, sd_b, sd_w, higher).startswith(start)


@pytest.mark.parametrize("bad", [{"seeds": []}, {"pairs": 1}, {"n_test": 1}, {"stop_after": "nope"}, {"nonsense": 1},
                                 {"real_domain": "mri"}, {"site_size": 1}])
def test_settings_refuse_bad_values(bad):
    with pytest.raises(ValueError):
        ReproduceSettings.from_dict({"work": "w", **bad})


def test_real_domain_moves_the_segmentation_cases_only():
    s = ReproduceSettings(work="w", n_train=2, n_test=3, n_val=2, pairs=3, real_offset=100, real_domain="lowdose")
    assert s.train_source == "phantom:2@100:lowdose" and s.seg_test_source == "phantom:3@102:lowdose"
    assert s.val_source == "phantom:2@108:lowdose"
    assert s.test_source == "phantom:3@102"   # Table 1's pairs stay in the TCDM's own domain


def test_sites_group_table1_pairs_and_floor_only():
    s = ReproduceSettings(work="w", n_train=2, n_test=3, pairs=3, real_offset=100, real_domain="lowdose", site_size=5)
    assert s.test_source == "phantom:3@102/5" and s.floor_source == "phantom:3@105/5"
    assert s.seg_test_source == "phantom:3@102:lowdose" and s.train_source == "phantom:2@100:lowdose"


def test_unknown_scale_is_refused(tmp_path):
    from fcas.pipeline.reproduce import settings_from_cfg

    cfg = _smoke_cfg(tmp_path, "x")
    cfg.scale = "huge"
    with pytest.raises(ValueError, match="huge"):
        settings_from_cfg(cfg)


def test_held_out_pairs_noise_follows_the_seed(tiny_checkpoint):
    from fcas.diffusion.data import load_cases

    cases = load_cases("phantom:2@5000", (32, 32, 32), (4.0, 4.0, 4.0))
    a = sample_held_out_pairs(tiny_checkpoint, cases, 2, 2, seed=0)
    b = sample_held_out_pairs(tiny_checkpoint, cases, 2, 2, seed=0)
    c = sample_held_out_pairs(tiny_checkpoint, cases, 2, 2, seed=1)
    assert len(a) == 2 and a[0].shape == (32, 32, 32) and 0.0 <= a[0].min() and a[0].max() <= 1.0
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
