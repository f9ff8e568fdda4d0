"""The scale planner: every figure sourced, the arithmetic consistent, the CLI's text and JSON."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fcas.planning import PlanRequest, load_hardware, make_plan, plan_to_json

ROOT = Path(__file__).resolve().parent.parent
PROFILES = sorted(p.stem for p in (ROOT / "configs" / "hardware").glob("*.yaml"))


@pytest.mark.parametrize("gpu", PROFILES)
def test_every_figure_of_a_paper_plan_states_its_source(gpu):
    plan = plan_to_json(make_plan(PlanRequest(n=100_000, preset="paper", hardware=gpu)))
    figures = {**plan["inputs"], **plan["plan"]}
    assert {"sampler_actors", "cpu_workers", "wall_s", "gpu_hours", "output_bytes"} <= set(plan["plan"])
    for name, f in figures.items():
        assert isinstance(f["value"], (int, float)) and math.isfinite(f["value"]), name
        assert f["source"].strip() and f["unit"].strip(), name
    for name, f in plan["plan"].items():
        assert f["source"].startswith("derived: "), name


def test_gpu_plan_arithmetic():
    base = make_plan(PlanRequest(n=100_000, preset="paper", hardware="a100-80gb", sampler_nodes=8))
    p, i = base["plan"], base["inputs"]
    assert base["bottleneck"] == "sampler"
    assert p["sampler_samples_per_s"].value == pytest.approx(8 / p["sampler_s_per_sample"].value)
    assert p["wall_s"].value == pytest.approx(i["startup_s"].value + 100_000 / p["pipeline_samples_per_s"].value)
    # the CPU workers planned cover the cores that keep the GPUs busy
    assert p["cpu_workers"].value * 32 >= p["cpu_cores_to_keep_samplers_busy"].value
    assert p["gpu_hours"].value == pytest.approx(8 * p["wall_s"].value / 3600)
    assert p["gpu_busy_hours"].value <= p["gpu_hours"].value
    # twice the GPUs: half the sampling time, the same GPU-hours of work, the same bytes
    twice = make_plan(PlanRequest(n=100_000, preset="paper", hardware="a100-80gb", sampler_nodes=16))["plan"]
    run = p["wall_s"].value - i["startup_s"].value
    assert twice["wall_s"].value - i["startup_s"].value == pytest.approx(run / 2)
    assert twice["gpu_busy_hours"].value == pytest.approx(p["gpu_busy_hours"].value)
    assert twice["output_bytes"].value == p["output_bytes"].value == pytest.approx(100_000 * p["output_bytes_per_sample"].value)
    # image-mode SSV decodes every k-th x0: dearer than latent mode; an H100 profile is faster than A100
    image = make_plan(PlanRequest(n=100_000, preset="paper", hardware="a100-80gb", ssv_mode="image"))["plan"]
    assert image["sampler_s_per_sample"].value > p["sampler_s_per_sample"].value
    h100 = make_plan(PlanRequest(n=100_000, preset="paper", hardware="h100-80gb"))["plan"]
    assert h100["wall_s"].value < p["wall_s"].value
    assert p["cost_usd"].value > 0


def test_cpu_profile_is_the_measured_benchmark():
    hw = load_hardware("cpu-2core")
    bench = json.loads((ROOT / "benchmarks" / "results" / "synthesize_demo_cpu2.json").read_text())
    plan = make_plan(PlanRequest(n=50, preset="demo", hardware="cpu-2core", sampler_nodes=1,
                                 steps=bench["pipeline"]["steps"], ssv_every=bench["pipeline"]["ssv_every"]), hw)
    split = bench["pipeline"]["sampler_split_seconds"]
    # at the benchmark's own preset and steps the planner gives back the measured sampler time
    assert plan["plan"]["sampler_s_per_sample"].value == pytest.approx(sum(split.values()), rel=1e-6)
    assert plan["plan"]["gpu_hours"].value == 0 and "cost_usd" not in plan["plan"]
    assert all("benchmarks/results/synthesize_demo_cpu2.json" in f.source for k, f in hw.figures.items()
               if not k.startswith("_"))


def test_bad_profiles_and_requests_are_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ninherit: a100-80gb\nfigures:\n  decode_s_per_mvox: {value: 1.0}\n")
    with pytest.raises(ValueError, match="decode_s_per_mvox.*non-empty source"):
        load_hardware(str(bad))
    bad.write_text("name: bad\nfigures:\n  decode_s_per_mvox: {value: 1.0, source: me}\n")
    with pytest.raises(ValueError, match="missing figures"):
        load_hardware(str(bad))
    bad.write_text("name: bad\nmeasured: benchmarks/results/none.json\n")
    with pytest.raises(ValueError, match="none.json not found; run benchmarks/synthesize.py"):
        load_hardware(str(bad))
    with pytest.raises(ValueError, match="unknown hardware profile 'z80'"):
        load_hardware("z80")
    with pytest.raises(ValueError, match="ssv_mode"):
        PlanRequest(n=1, ssv_mode="maybe")


def test_cli_prints_text_and_json(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, "jobs/plan.py", "n=100000", "preset=paper", "gpu=l40s-48gb",
                           "sampler_nodes=8", f"json={out}", "prices.sampler_node_hour=3.0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "n=100,000 preset=paper hardware=l40s-48gb" in proc.stdout
    assert "wall_h" in proc.stdout and "[derived: " in proc.stdout and "MAISI" in proc.stdout
    plan = json.loads(out.read_text())
    assert plan["inputs"]["price_sampler_node_hour"] == {"value": 3.0, "unit": "USD/h",
                                                         "source": "given on the command line (prices.*)"}
    bad = subprocess.run([sys.executable, "jobs/plan.py", "gpu=z80"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "plan: unknown hardware profile 'z80'" in bad.stderr


def test_training_plan_of_the_paper_run():
    from fcas.planning import TrainingPlanRequest, make_training_plan

    hw = load_hardware("a100-80gb")
    plain = make_training_plan(TrainingPlanRequest(), hw)
    cached = make_training_plan(TrainingPlanRequest(latent_cache=True), hw)
    for plan in (plain, cached):
        for fig in (*plan["inputs"].values(), *plan["plan"].values()):
            assert fig.source.strip() and math.isfinite(fig.value), fig
    p, c, i = plain["plan"], cached["plan"], plain["inputs"]
    assert p["steps"].value == 10_000                       # 200 epochs * 200 cases / 4 samples per step
    assert i["crop_mvox"].value == pytest.approx(512 * 512 * 128 / 1e6)
    assert i["crop_latent_mvox"].value == pytest.approx(128 * 128 * 32 / 1e6)
    # the parameters are those of the paper networks the H200 benchmark built (unet 166.60M + controlnet 69.56M)
    assert i["trainable_parameters"].value == pytest.approx(236.16e6, abs=0.02e6)
    denoise = 4 * i["crop_latent_mvox"].value * 0.2713 * 3.0
    assert c["step_s"].value == pytest.approx(denoise)
    assert p["step_s"].value == pytest.approx(denoise + 4 * i["crop_mvox"].value * 0.2384 * 1.0)
    assert p["gpu_hours"].value > 10 * c["gpu_hours"].value   # encoding every crop dominates without the cache
    assert c["peak_memory_gib_per_gpu"].value == pytest.approx(c["weights_and_optimizer_gib"].value
                                                              + c["activations_gib"].value)
    eight = make_training_plan(TrainingPlanRequest(gpus=8, latent_cache=True), hw)["plan"]
    assert eight["steps"].value == 1250 and eight["memory_fraction_of_gpu"].value == c["memory_fraction_of_gpu"].value
    with pytest.raises(ValueError, match="has no GPU"):
        make_training_plan(TrainingPlanRequest(), load_hardware("cpu-2core"))
    with pytest.raises(ValueError, match="batch_pairs >= 1"):
        TrainingPlanRequest(batch_pairs=0)


def test_cli_training_plan_and_a_bad_what():
    proc = subprocess.run([sys.executable, "jobs/plan.py", "what=training", "gpu=h200-141gb", "training.gpus=8",
                           "training.latent_cache=true"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "FCaS TCDM training plan: preset=paper model=paper hardware=h200-141gb gpus=8" in proc.stdout
    assert "peak_memory_gib_per_gpu" in proc.stdout and "assumption" in proc.stdout
    bad = subprocess.run([sys.executable, "jobs/plan.py", "what=train"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "plan: what='train': use synthesis or training" in bad.stderr
