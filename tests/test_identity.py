"""The run identity file (fcas.synthesis.identity) on its own: record once, accept the same, refuse a
difference by name, and the one-line ending of a job (fcas.cli)."""
import json

import pytest

from fcas.cli import user_errors
from fcas.synthesis.identity import IDENTITY_FILE, check_identity, identity_diff, library_digest
from fcas.synthesis.plan import CaseRef, TemplateLibrary


def test_identity_is_recorded_once_and_differences_are_named(tmp_path):
    out = str(tmp_path)
    settings = {"content": {"sampler": {"steps": 20}, "seed": 0}, "checkpoint_digest": "ab" * 32}
    first = check_identity(out, "settings", settings)
    assert first["settings"] == settings and json.loads((tmp_path / IDENTITY_FILE).read_text()) == first
    assert check_identity(out, "settings", settings) == first          # the same run: accepted
    check_identity(out, "templates", {"library_digest": "x"})        # a new section is added once
    assert set(json.loads((tmp_path / IDENTITY_FILE).read_text())) == {"version", "settings", "templates"}
    other = {"content": {"sampler": {"steps": 4}, "seed": 0}, "checkpoint_digest": "ab" * 32}
    with pytest.raises(ValueError, match=r"settings differ: content\.sampler\.steps: 20 -> 4\); use the run's"):
        check_identity(out, "settings", other)
    with pytest.raises(ValueError, match="templates differ: library_digest: 'x' -> 'y'"):
        check_identity(out, "templates", {"library_digest": "y"})
    (tmp_path / IDENTITY_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="unreadable run identity"):
        check_identity(out, "settings", settings)


def test_identity_diff_lists_at_most_three_keys():
    a = {f"k{i}": i for i in range(5)}
    b = {f"k{i}": i + 1 for i in range(5)}
    d = identity_diff(a, b)
    assert d[:3] == ["k0: 0 -> 1", "k1: 1 -> 2", "k2: 2 -> 3"] and d[3] == "... 2 more"
    assert identity_diff({"x": 1}, {"x": 1, "y": 2}) == ["y: '<unset>' -> 2"]


def test_library_digest_follows_the_case_ids_in_order():
    ref = lambda i: CaseRef(f"c{i}", f"/i{i}", f"/l{i}")  # noqa: E731
    a = TemplateLibrary((ref(0), ref(1)), (ref(2),))
    b = TemplateLibrary((ref(0), ref(1)), (ref(2),))
    moved = TemplateLibrary((CaseRef("c0", "s3://x/i0", "s3://x/l0"), ref(1)), (ref(2),))   # paths do not count
    assert library_digest(a) == library_digest(b) == library_digest(moved)
    assert library_digest(TemplateLibrary((ref(1), ref(0)), (ref(2),))) != library_digest(a)


def test_user_errors_end_a_job_with_one_line_and_status_2(capsys, monkeypatch):
    @user_errors("demo")
    def main(kind):
        if kind == "value":
            raise ValueError("out=/x: not writable\nsecond line")
        raise RuntimeError("a bug")

    with pytest.raises(SystemExit) as exc:
        main("value")
    assert exc.value.code == 2 and capsys.readouterr().err == "demo: out=/x: not writable\n"
    with pytest.raises(RuntimeError):   # not a user mistake: the traceback stays
        main("bug")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ValueError):
        main("value")
