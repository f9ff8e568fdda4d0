"""benchmarks/table1_retrains.py: Table 1 pooled over independent retrains (pure arithmetic on table1_pairs JSONs)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import table1_retrains  # noqa: E402


def _arm(ssim, fid):
    return {"ssim_mean": ssim, "rmse_mean": 1 - ssim, "ssim_zeroed_mean": ssim, "ssim_mean_whole": ssim,
            "rmse_mean_whole": 1 - ssim, "fid": fid, "fid_patches": fid}


def _retrain(path, pairs):
    """One retrain's JSON: ``pairs`` is [(template ssim, mask-only ssim, template fid, mask-only fid)] per seed."""
    runs = [{"seed": s, "template": _arm(t, ft), "mask_only": _arm(m, fm)} for s, (t, m, ft, fm) in enumerate(pairs)]
    path.write_text(json.dumps({"runs": runs}))
    return str(path)


def test_each_retrain_is_its_seed_mean_and_the_spread_is_across_retrains(tmp_path, capsys):
    a = _retrain(tmp_path / "a.json", [(0.80, 0.78, 100, 120), (0.82, 0.78, 100, 80)])   # means 0.81 / 0.78
    b = _retrain(tmp_path / "b.json", [(0.77, 0.79, 90, 100), (0.79, 0.79, 90, 100)])    # means 0.78 / 0.79
    s = table1_retrains.main([a, b, "--json", str(tmp_path / "s.json")])
    m = s["metrics"]["ssim_mean"]
    assert m["template"] == pytest.approx([0.81, 0.78]) and m["mask_only"] == pytest.approx([0.78, 0.79])
    assert m["template_mean"] == pytest.approx(0.795) and m["template_sd"] == pytest.approx(0.0212132, abs=1e-6)
    assert m["diff_mean"] == pytest.approx(0.01) and m["template_wins"] == 1
    rmse = s["metrics"]["rmse_mean"]             # lower is better: the first retrain's template wins it
    assert rmse["diff_mean"] == pytest.approx(-0.01) and rmse["template_wins"] == 1
    fid = s["metrics"]["fid"]                    # 100 vs 100 is no win; 90 vs 100 is
    assert fid["diff_mean"] == pytest.approx(-5.0) and fid["template_wins"] == 1
    assert json.loads((tmp_path / "s.json").read_text())["metrics"]["ssim_mean"]["template_wins"] == 1
    assert "2 retrains, seeds [0, 1]" in capsys.readouterr().out


def test_bad_inputs_stop_with_one_line(tmp_path):
    good = _retrain(tmp_path / "a.json", [(0.8, 0.8, 1, 1)])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"bad.json: not a table1_pairs JSON"):
        table1_retrains.main([good, str(tmp_path / "bad.json")])
    other = _retrain(tmp_path / "c.json", [(0.8, 0.8, 1, 1), (0.8, 0.8, 1, 1)])
    with pytest.raises(SystemExit, match="different seeds"):
        table1_retrains.main([good, other])
