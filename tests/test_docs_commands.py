"""Docs and code cannot drift (issue 17): every shell command of README.md and docs/*.md runs, composes into its
job's settings, or names the test (or the reason) that covers it (the rules: tests/docs_commands.py); README's
Layout names every part of the repository and of fcas/."""
from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess

import pytest
from omegaconf import OmegaConf

from fcas.bundled import config_dir
from fcas.io import storage
from fcas.pipeline.commands import JOBS
from tests.docs_commands import (ROOT, RULES, Command, doc_commands, job_invocation, localized, make_recipe, rules_for,
                                 tiny_invocation, untagged_commands)

COMMANDS = doc_commands()
KINDS = ("run", "compose", "elsewhere", "external")

# job -> (module, function): what its command builds from the composed config before any work (``settings_from_dict``
# takes the resolved plain config), and the other config keys the command reads itself
BUILDERS = {
    "prepare": ("fcas.pipeline.jobs", "prepare_job_from_cfg", ("ray",)),
    "synthesize": ("fcas.pipeline.jobs", "synthesis_job_from_cfg", ("ray", "progress")),
    "plan": ("fcas.pipeline.jobs", "plan_request_from_cfg", ("json", "format")),
    "train_vae": ("fcas.pipeline.train_vae", "vae_settings_from_cfg", ("trainer",)),
    "cache_latents": ("fcas.pipeline.cache_latents", "cache_job_from_cfg", ("progress",)),
    "train_tcdm": ("fcas.pipeline.train_tcdm", "tcdm_settings_from_cfg", ("trainer",)),
    "pretrain_cal": ("fcas.pipeline.pretrain_cal", "cal_settings_from_cfg", ("trainer", "data")),
    "evaluate": ("fcas.evaluation", "settings_from_dict", ()),
    "export_nnunet": ("fcas.export.nnunet", "settings_from_dict", ()),
}


def _rule(command: Command):
    (rule,) = rules_for(command)
    return rule


def _of_kind(kind: str) -> list:
    """The commands whose one rule is of ``kind``, as pytest params (slow runs marked)."""
    params = []
    for command in COMMANDS:
        rules = rules_for(command)
        if len(rules) == 1 and rules[0].kind == kind:
            params.append(pytest.param(command, id=command.where, marks=[pytest.mark.slow] if rules[0].slow else []))
    return params


def test_every_documented_command_has_exactly_one_rule():
    assert len(COMMANDS) > 20   # the parser found the blocks
    problems = [f"{c.where}: {len(rules_for(c))} rules match `{c.text}`" for c in COMMANDS if len(rules_for(c)) != 1]
    assert not problems, "\n".join(problems) + "\nadd (or narrow) a rule in tests/docs_commands.py RULES"
    untagged = untagged_commands()
    assert not untagged, "commands in blocks not tagged ```bash (so not checked):\n" + "\n".join(untagged)
    unused = [r.pattern for r in RULES if not any(r.matches(c) for c in COMMANDS)]
    assert not unused, f"rules that match no documented command (remove them): {unused}"
    for r in RULES:
        assert r.kind in KINDS and r.note, r
        assert bool(r.expect) == (r.kind == "run") and bool(r.where[0]) == (r.kind == "elsewhere"), r


def _compose(job: str, overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        return compose(config_name=job, overrides=list(overrides))


def _settings(job: str, cfg) -> tuple:
    assert job in BUILDERS, f"add {job!r} to BUILDERS in {__file__}"
    module, function, read_too = BUILDERS[job]
    plain = OmegaConf.to_container(cfg, resolve=True)
    build = getattr(importlib.import_module(module), function)
    return build(plain if function == "settings_from_dict" else cfg), *(plain[k] for k in read_too)


@pytest.mark.parametrize("command", _of_kind("compose"))
def test_documented_job_command_composes_into_the_jobs_settings(command):
    """Hydra composes the job's config with the overrides as documented (an unknown key or a value read as a
    config-group choice fails here), the job builds its settings from it (a wrong type fails), and every override
    that changes the config changes the settings too, or is needed (else the job ignores it). No I/O: paths stay
    as written."""
    rule = _rule(command)
    calls = _calls(command, rule)
    assert calls and all(calls), f"{command.where}: no job call in `{command.text}`"
    for job, overrides in calls:
        assert job in JOBS and (ROOT / "jobs" / f"{job}.py").is_file(), job
        cfg = _compose(job, overrides)
        settings = _settings(job, cfg)
        for i, override in enumerate(overrides):
            without = _compose(job, overrides[:i] + overrides[i + 1:])
            if OmegaConf.to_container(without, resolve=True) == OmegaConf.to_container(cfg, resolve=True):
                continue   # the default already
            try:
                other = _settings(job, without)
            except ValueError:   # the job needs it
                continue
            assert other != settings, f"{command.where}: {job} ignores {override}"


def _calls(command: Command, rule) -> list[tuple[str, list[str]]]:
    return [job_invocation(words) for words in (make_recipe(rule.make) if rule.make else [command.words])]


def _tiny_commands() -> list:
    """The compose commands that also run at the tiny preset, in documented order (README first)."""
    return [pytest.param(c, id=c.where) for c in COMMANDS
            if len(rules_for(c)) == 1 and rules_for(c)[0].kind == "compose" and rules_for(c)[0].tiny]


def _mmwhs_case(folder, key: str, seed: int) -> None:
    """A phantom as MM-WHS ships a CT: ``<key>_image.nii.gz`` and a label map in MM-WHS's own ids."""
    import nibabel as nib
    import numpy as np

    from fcas.labels import default_schema
    from fcas.phantom import make_case

    case = make_case(seed, shape=(32, 32, 32), spacing=(3.0, 3.0, 3.0))
    mmwhs = {"left_ventricle": 500, "right_ventricle": 600, "left_atrium": 420, "right_atrium": 550,
             "lv_myocardium": 205, "ascending_aorta": 820, "pulmonary_artery": 850}
    label = np.zeros(case.label.shape, np.uint16)
    for name, value in mmwhs.items():
        label[case.label == default_schema().classes[name]] = value
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, array in (("image", case.image.astype(np.int16)), ("label", label)):
        img = nib.Nifti1Image(array, case.affine)
        img.set_qform(case.affine, code=1)
        img.set_sform(case.affine, code=1)
        nib.save(img, str(folder / f"{key}_{suffix}.nii.gz"))


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory, ray_local, s3_server):
    """The folders the documented commands read, small: ``data/mmwhs`` (two MM-WHS-like cases) and
    ``data/imagecas`` (one ImageCAS case with TotalSegmentator's outputs beside it, as docs/data.md lays out)."""
    from fcas.phantom import make_case
    from tests.test_prepare_sources import write_recipe_case

    tmp = tmp_path_factory.mktemp("docs-tiny")
    for key, seed in (("ct_1001", 1), ("ct_1002", 2)):
        _mmwhs_case(tmp / "data" / "mmwhs", key, seed)
    write_recipe_case(tmp / "data" / "imagecas", "1", make_case(2, shape=(32, 32, 32), spacing=(3.0, 3.0, 3.0)))
    return {"tmp": tmp, "s3": f"{s3_server}/docs-tiny", "ran": {}}


@pytest.mark.slow
@pytest.mark.parametrize("command", _tiny_commands())
def test_documented_job_command_runs_at_the_tiny_preset(command, tiny_world, capsys):
    """The job of each heavy command, run in this process (on the session's Ray) at the tiny preset with the
    documented overrides scaled down (tests/docs_commands.py ``tiny_invocation``); commands of one file share
    their outputs, in order, so ``evaluate run=outputs/run1`` reads the run an earlier command made. A command
    whose tiny form repeats an earlier one's but for ``out=`` (the same job documented on another page, or with
    a size the tiny preset scales away) is not run again: the earlier local output is copied to its ``out=``
    (runs are portable), which later commands then read."""
    from fcas.pipeline.commands import run_job

    rule = _rule(command)
    page = command.where.split(":")[0]
    tmp = tiny_world["tmp"] / re.sub(r"\W+", "-", page)
    for job, overrides in _calls(command, rule):
        argv = tiny_invocation(job, overrides, tmp, tiny_world["tmp"] / "data", tiny_world["s3"], command.where)
        out = next(a.split("=", 1)[1] for a in argv if a.startswith("out="))
        key = (job, tuple(sorted(a.replace(str(tmp), "<page>") for a in argv if not a.startswith("out="))),
               out.startswith("s3://"))
        earlier = tiny_world["ran"].get(key)
        if earlier is not None and out.startswith("s3://"):
            out = earlier   # no later command reads a run on S3: the earlier one is checked below
        elif earlier is not None:
            if not storage.exists(out):
                shutil.copytree(earlier, out)
        else:
            try:
                run_job(job, argv)
            except SystemExit as exit_:
                pytest.fail(f"{command.where}: fcas {job} {' '.join(argv)} exited {exit_.code}: "
                            f"{capsys.readouterr().err[-2000:]}")
            tiny_world["ran"][key] = out
        assert storage.exists(out) and storage.listdir(out), f"{command.where}: {job} wrote nothing to {out}"


@pytest.mark.parametrize("command", _of_kind("run"))
def test_documented_command_runs(command, tmp_path):
    rule = _rule(command)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}   # a local Ray of its own
    words = localized(command.words, tmp_path)
    proc = subprocess.run(words, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    logs = f"{' '.join(words)}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, logs
    assert re.search(rule.expect, proc.stdout), logs


def test_commands_covered_elsewhere_name_what_covers_them():
    for command in COMMANDS:
        rule = _rule(command)
        if rule.kind == "elsewhere":
            path, text = rule.where
            assert (ROOT / path).is_file() and text in (ROOT / path).read_text(), f"{command.where}: {rule.where}"


# ---- README's Layout ------------------------------------------------------------------------------------------
def _layout() -> dict[str, str]:
    """README's Layout block as {entry: its description}, one line each: top-level lines, and the lines indented
    by two under the ``fcas/`` line as ``fcas/<name>``."""
    block = re.search(r"^## Layout\n+```\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.M | re.S)
    assert block, "README.md has no Layout block"
    entries = {}
    for line in block.group(1).splitlines():
        indent, name, text = re.match(r"( *)(\S+)\s*(.*)", line).groups()
        assert len(indent) in (0, 2), f"README Layout: one line per entry, not `{line}`"
        entries[f"fcas/{name}" if indent else name] = text
    return entries


def test_readme_layout_names_every_folder_package_and_module():
    entries = _layout()
    fcas = ROOT / "fcas"
    packages = {p.parent.relative_to(ROOT).as_posix() + "/" for p in fcas.rglob("__init__.py") if p.parent != fcas}
    modules = {f"fcas/{p.name}" for p in fcas.glob("*.py") if p.name != "__init__.py"}
    folders = {f"{p.name}/" for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))
               and p.name not in ("outputs", "build", "dist") and not p.name.endswith(".egg-info")}
    expected = packages | modules | folders
    assert set(entries) == expected, "README Layout: one line for each; missing " \
        f"{sorted(expected - set(entries))}, stale {sorted(set(entries) - expected)}"
    for package in packages:   # each module of a subpackage is named on its line (commands/: one per job)
        names = [p.stem for p in (ROOT / package).glob("*.py") if p.name != "__init__.py"]
        names = [n for n in names if not (package == "fcas/pipeline/commands/" and n in JOBS)]
        unnamed = [n for n in names if not re.search(rf"\b{n}\b", entries[package], flags=re.I)]
        assert not unnamed, f"README Layout, {package}: name {unnamed}"
