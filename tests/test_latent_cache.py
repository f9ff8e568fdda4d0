"""The latent cache of TCDM training (jobs/cache_latents.py, train.latent_cache): a cache built with real Ray holds
the VAE's one-case posterior means, the cases' images and labels; training from it gives the on-the-fly loss; a
stale cache (another VAE, missing cases, another grid) is refused before any training; bad URIs exit 2, one line."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fcas.diffusion.conditioning import hu_to_unit
from fcas.diffusion.data import CaseArrays, load_cases, pair_batch
from fcas.diffusion.latent_cache import MANIFEST, check_latent_cache, read_cached_case, read_latent_cache
from fcas.training.tcdm import TCDMSettings, train_tcdm_loop
from fcas.io import manifest
from fcas.models.bundle import load_vae, vae_digest
from fcas.models.checkpoint import checkpoint_digest, load_checkpoint, save_checkpoint
from fcas.models.vae import vae_encode
from fcas.pipeline.cache_latents import CacheJob, CacheResources, run_cache_latents

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
TINY = {"shape": [32, 32, 32], "spacing": [4.0, 4.0, 4.0], "preset": "tiny"}
VAE = "checkpoints/tiny"   # the bundled tiny checkpoint's VAE (found from any directory)
pytestmark = pytest.mark.filterwarnings("ignore:TCDM uses an untrained")


def _job(out, data="phantom:3", **kw) -> CacheJob:
    return CacheJob(data=data, out=str(out), shape=tuple(TINY["shape"]), spacing=tuple(TINY["spacing"]), vae=VAE,
                    shard_cases=2, resources=CacheResources(cpus_per_actor=1), **kw)


@pytest.fixture(scope="module")
def tiny_cache(ray_local, tmp_path_factory):
    """``(cache folder, summary)``: phantom:3 at the tiny preset, encoded by the tiny VAE, 2 cases per shard."""
    out = tmp_path_factory.mktemp("latents")
    return out, run_cache_latents(_job(out), progress=False)


def _settings(out, steps=2, data="phantom:3", vae=VAE, **train) -> TCDMSettings:
    return TCDMSettings.from_dict({**TINY, "data": data, "out": str(out), "model": {"name": "tiny"}, "vae": vae,
                                   "train": {"steps": steps, "checkpoint_every": steps, **train}})


def _history(summary) -> torch.Tensor:
    return load_checkpoint(summary["latest_checkpoint"]).state_dict("history")["loss"]


def test_cache_holds_the_vae_posterior_mean_image_and_label_of_every_case(tiny_cache, tmp_path):
    out, summary = tiny_cache
    digest = checkpoint_digest(VAE)
    assert (summary["cases"], summary["encoded"], summary["kept"], summary["vae_digest"]) == (3, 3, 0, digest)
    stored = manifest.read_table(out / MANIFEST).to_pylist()   # as written: shard paths relative to the cache
    assert [r["case_id"] for r in stored] == ["phantom_00000", "phantom_00001", "phantom_00002"]
    assert all(r["uri"].startswith("shards/") and r["uri"].endswith(".npz") and (out / r["uri"]).is_file()
               for r in stored)
    assert len({r["uri"] for r in stored}) == summary["shards"] == 2   # 3 cases, 2 per shard
    assert {(tuple(r["latent_shape"]), tuple(r["image_shape"]), r["vae_digest"]) for r in stored} == \
        {((4, 8, 8, 8), (32, 32, 32), digest)}
    assert not list(out.rglob("*.tmp"))
    vae, _, _, loaded_digest = load_vae(VAE, None)
    assert vae_digest(VAE) == loaded_digest == digest and vae_digest(None, 3) == "random:3"
    cases = load_cases("phantom:3", TINY["shape"], TINY["spacing"])
    for i, r in enumerate(read_latent_cache(str(out)).to_pylist()):   # read back: shard URIs absolute
        z, img, lab = read_cached_case(r["uri"], r["case_id"])
        with torch.no_grad():
            want = vae_encode(vae, cases.images[i:i + 1])[0]   # what training encodes: the unscaled posterior mean
        assert torch.allclose(torch.from_numpy(z), want, atol=1e-5)
        assert torch.equal(hu_to_unit(img), cases.images[i, 0]) and torch.equal(torch.from_numpy(lab), cases.labels[i])
    # a rerun encodes nothing; a copy grown to phantom:4 encodes only the new case
    assert run_cache_latents(_job(out), progress=False)["encoded"] == 0
    shutil.copytree(out, tmp_path / "grown")
    grown = run_cache_latents(_job(tmp_path / "grown", data="phantom:4"), progress=False)
    assert (grown["encoded"], grown["kept"], grown["cases"]) == (1, 3, 4)
    with pytest.raises(ValueError, match="holds latents of VAE .* this job encodes with random:0; use another out"):
        run_cache_latents(replace(_job(tmp_path / "grown"), vae=None), progress=False)


def test_pair_batch_crops_the_latents_at_the_image_window_over_four():
    images = torch.rand(3, 1, 16, 16, 16)
    cases = CaseArrays(["a", "b", "c"], images, torch.zeros(3, 16, 16, 16, dtype=torch.uint8), [np.eye(4)] * 3,
                       torch.nn.functional.avg_pool3d(images, 4))
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    pairs = np.array([[0, 1], [2, 0]])
    batch = pair_batch(cases, pairs, (8, 8, 8), rng_a)
    plain = pair_batch(replace(cases, latents=None), pairs, (8, 8, 8), rng_b)   # the same windows without latents
    assert batch["latent_a"].shape == (2, 1, 2, 2, 2) and "latent_a" not in plain
    for x in "ab":
        assert torch.equal(batch[f"image_{x}"], plain[f"image_{x}"])
        assert torch.allclose(batch[f"latent_{x}"], torch.nn.functional.avg_pool3d(batch[f"image_{x}"], 4))


def test_training_from_the_cache_gives_the_on_the_fly_loss(tiny_cache, tmp_path):
    """Whole volumes, the bundled tiny VAE (its scale factor): the cache's latents are the ones training would
    encode, so the two runs see the same losses; with a crop the cached run still trains (finite loss)."""
    cache = str(tiny_cache[0])
    fly = train_tcdm_loop(_settings(tmp_path / "fly"), progress=False)
    cached = train_tcdm_loop(_settings(tmp_path / "cached", latent_cache=cache), progress=False)
    assert fly["steps_run"] == cached["steps_run"] == 2 and fly["scale_factor"] == cached["scale_factor"]
    assert torch.allclose(_history(fly), _history(cached), rtol=1e-5, atol=0), (_history(fly), _history(cached))
    ck = load_checkpoint(cached["latest_checkpoint"])
    assert ck.config["train"]["latent_cache"] == cache and ck.config["vae_digest"] == checkpoint_digest(VAE)
    assert "latent_cache" not in load_checkpoint(fly["latest_checkpoint"]).config["train"]   # configs as before
    crop = train_tcdm_loop(_settings(tmp_path / "crop", 1, latent_cache=cache, crop=[16, 16, 16]), progress=False)
    assert np.isfinite(crop["last_loss"])


def test_a_stale_cache_is_refused_before_training(tiny_cache, tmp_path, ray_local):
    """Another VAE (the tiny one with perturbed weights), training cases the cache lacks, another grid: one-line
    ValueErrors naming the cache (and both digests), from the Ray-free loop and from the job's driver."""
    from fcas.pipeline.train_tcdm import run

    cache = str(tiny_cache[0])
    ck = load_checkpoint(VAE)
    sds = {name: ck.state_dict(name) for name in ck.files}
    sds["vae"] = {k: v + 1e-3 if v.is_floating_point() else v for k, v in sds["vae"].items()}
    other = str(tmp_path / "vae2")
    save_checkpoint(other, config=ck.config, state_dicts=sds, step=ck.step)
    mine, theirs = checkpoint_digest(VAE), checkpoint_digest(other)
    assert mine != theirs
    stale = f"latent cache {cache} was made with VAE {mine}, but training uses VAE {theirs}"
    with pytest.raises(ValueError, match=stale):
        train_tcdm_loop(_settings(tmp_path / "a", vae=other, latent_cache=cache), progress=False)
    assert not (tmp_path / "a").exists()   # nothing trained, nothing written
    cfg = {"preset": {"name": "tiny", **{k: TINY[k] for k in ("shape", "spacing")}}, "model": {"name": "tiny"},
           "data": "phantom:3", "out": str(tmp_path / "b"), "vae": other, "train": {"steps": 1, "latent_cache": cache},
           "trainer": {"num_workers": 1, "progress": False, "storage_path": str(tmp_path / "ray")}}
    with pytest.raises(ValueError, match=stale) as err:
        run(cfg)
    assert "\n" not in str(err.value) and not (tmp_path / "ray").exists()   # refused before Ray Train
    with pytest.raises(ValueError, match=r"lacks 1 of the 4 training cases \(e.g. phantom_00003\)"):
        run({**cfg, "vae": VAE, "data": "phantom:4"})
    with pytest.raises(ValueError, match=r"on the grid \(32, 32, 32\), training expects \(64, 64, 64\)"):
        check_latent_cache(cache, mine, shape=(64, 64, 64))


@pytest.mark.slow
def test_ray_train_job_trains_from_the_cache(tiny_cache, tmp_path, ray_local):
    """The job's path: the cached shards streamed by Ray Data (latent column included) into a Ray Train worker."""
    from fcas.pipeline.train_tcdm import run

    cfg = {"preset": {"name": "tiny", **{k: TINY[k] for k in ("shape", "spacing")}}, "model": {"name": "tiny"},
           "data": "phantom:3", "out": str(tmp_path / "tcdm"), "vae": VAE,
           "train": {"steps": 2, "checkpoint_every": 2, "latent_cache": str(tiny_cache[0])},
           "trainer": {"num_workers": 1, "progress": False, "storage_path": str(tmp_path / "ray")}}
    summary = run(cfg)
    assert summary["step"] == 2
    loss = _history(summary)
    assert loss.shape == (2,) and bool(torch.isfinite(loss).all())


def _job_process(job: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return subprocess.run([sys.executable, f"jobs/{job}.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("job, args, reason", [
    ("train_tcdm", ("train.latent_cache={tmp}/nope",), "latent cache {tmp}/nope: no latents.parquet"),
    ("cache_latents", ("data={tmp}/nope",), "data source '{tmp}/nope': no cases manifest"),
    ("cache_latents", ("vae={tmp}/nope",), "{tmp}/nope is not a complete checkpoint"),
])
def test_bad_uris_exit_2_with_one_line(job, args, reason, tmp_path):
    proc = _job_process(job, *(a.format(tmp=tmp_path) for a in args), f"out={tmp_path}/o")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"{job}: ") and reason.format(tmp=tmp_path) in lines[0], lines[0]
    assert not (tmp_path / "o").exists()
