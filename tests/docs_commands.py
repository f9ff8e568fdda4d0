"""The shell commands of README.md and docs/*.md, and the one rule that checks each (tests/test_docs_commands.py).

A command is a line of a fenced ```bash / ```sh block, ``\\`` continuations joined, comments dropped, split as
the shell splits it. Its rule is the one entry of :data:`RULES` whose pattern matches the command's words
(joined by single spaces) from the start:

* ``run``: executed here as written, with the safe substitutions of :func:`localized` (the documented python
  and ``fcas`` are this environment's, ``out=/tmp/...`` and ``outputs/...`` go under the test's tmp_path);
* ``compose``: too heavy to run as written here (demo/paper presets, S3, /data, a run that must exist first):
  the job's Hydra config is composed with the documented overrides and the job's settings are built from it
  (for a submit to a cluster: the job it submits); then, unless the rule says ``tiny=False``, the job runs at
  the tiny preset (:func:`tiny_invocation`: the documented overrides with the sizes scaled down, outputs,
  ``/data`` inputs and ``s3://`` buckets moved under the test's folders), the commands of one file in their
  documented order, so a command may read what an earlier one wrote;
* ``elsewhere``: another test (or CI) runs it: ``where`` is ``(file, text it holds)``;
* ``external``: needs machines or tools we do not have; ``note`` says which.
"""
from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from fcas.pipeline.commands import JOBS

ROOT = Path(__file__).resolve().parent.parent
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
SHELLS = ("bash", "sh")


@dataclass(frozen=True)
class Command:
    where: str                    # file:line of its first line
    words: tuple[str, ...]        # as the shell passes them

    @property
    def text(self) -> str:
        return " ".join(self.words)


@dataclass(frozen=True)
class Rule:
    kind: str                     # run | compose | elsewhere | external
    pattern: str                  # re.match against Command.text
    note: str
    expect: str = ""              # run: a regex its stdout must match
    slow: bool = False            # run: takes more than ~10 s (pytest.mark.slow)
    where: tuple[str, str] = ("", "")   # elsewhere: (file under the repository, text it must hold)
    make: str = ""                # compose: the commands of this Makefile target instead of the command itself
    tiny: bool = True             # compose: also run the job at the tiny preset

    def matches(self, command: Command) -> bool:
        return re.match(self.pattern, command.text) is not None


COMPOSED_JOBS = "prepare|synthesize|train_vae|cache_latents|train_tcdm|pretrain_cal|evaluate|export_nnunet"
RULES = (
    Rule("run", r"(\.venv/bin/python jobs/plan\.py|fcas plan) (?!what=training)", "the planner is cheap: run as written",
         expect=r"FCaS synthesis plan: n=\d+(.|\n)* output_tb .* TB"),
    Rule("run", r"\.venv/bin/python jobs/plan\.py what=training ", "the training planner is cheap: run as written",
         expect=r"FCaS TCDM training plan: preset=paper(.|\n)* peak_memory_gib_per_gpu "),
    Rule("elsewhere", r"fcas synthesize preset=tiny n=2 ", "the same command, from the installed wheel in another folder",
         where=("tests/test_packaging.py", '"synthesize", "preset=tiny", "n=2"')),
    Rule("compose", rf"\.venv/bin/python jobs/({COMPOSED_JOBS})\.py (?!.*model=maisi)(?!.*train\.latent_cache=)",
         "demo/paper presets, S3, /data or a run made first: minutes to hours as written; runs at the tiny preset"),
    Rule("compose", r"\.venv/bin/python jobs/train_tcdm\.py .*model=maisi",
         "MAISI's released weights (GBs) are not here: composed; tests/test_maisi.py trains and samples from a "
         "small state dict of MAISI's architecture written by the test", tiny=False),
    Rule("compose", r"\.venv/bin/python jobs/train_tcdm\.py .*train\.latent_cache=",
         "composed; its tiny run, a Ray Train job reading a latent cache through Ray Data, is "
         "tests/test_latent_cache.py::test_ray_train_job_trains_from_the_cache", tiny=False),
    Rule("compose", r"(RAY_ADDRESS=\S+ )?ray job submit ", "needs a cluster's job API: the job it submits is composed"),
    Rule("compose", r"make demo$", "minutes of CPU: the Makefile's demo job is composed", make="demo"),
    Rule("elsewhere", r"make test$", "CI runs the suite", where=(".ci/run", "exec make test")),
    Rule("elsewhere", r"make install$", "every make test installs first", where=("Makefile", "\ntest: install ")),
    Rule("elsewhere", r"pip install \.$", "the wheel built, installed in a fresh venv and run",
         where=("tests/test_packaging.py", "def test_installed_commands_run_outside_the_repo(")),
    Rule("compose", r"cluster/local\.sh submit .*-- python jobs/",
         "the submit is tested with its own job (below): the job it submits is composed"),
    Rule("elsewhere", r"cluster/local\.sh (start|status|logs|stop)\b",
         "a local head started, a tiny job submitted, its status and logs read, the head stopped",
         where=("tests/test_local_cluster.py", "def test_local_sh_runs_a_job_through_ray_job_submit(")),
    Rule("external", r"ray (up|down|dashboard|job logs) ",
         "a cloud cluster (tests/test_cluster.py validates the autoscaler YAMLs as ray up does)"),
    Rule("external", r"export RAY_ADDRESS=", "points the ray CLI at a cluster's dashboard"),
    Rule("external", r"docker build ", "a Docker daemon and a registry (tests/test_cluster.py checks the Dockerfile)"),
    Rule("external", r"kubectl ", "a Kubernetes cluster with KubeRay (tests/test_cluster.py checks the manifests)"),
    Rule("external", r"TotalSegmentator ", "a separate tool with its own weights, not a dependency"),
)
# the first word of a line that reads as a command, in a block not tagged bash/sh (tag it, so that it is checked)
COMMAND_START = re.compile(r"(make|\.venv/bin/python|python3?|pip|fcas|ray|kubectl|docker|helm|cluster/\S+\.sh)"
                           r"(\s|$)")


def _blocks(path: Path):
    """``(info string, [(line number, line), ...])`` of each fenced block of a markdown file."""
    info, lines = None, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            if info is None:
                info, lines = line.strip()[3:].strip(), []
            else:
                yield info, lines
                info = None
        elif info is not None:
            lines.append((number, line))


def doc_commands(files=DOCS) -> list[Command]:
    """Every command of the fenced bash/sh blocks of ``files``, in order."""
    commands = []
    for path in files:
        for info, lines in _blocks(path):
            if info not in SHELLS:
                continue
            pending, start = "", 0
            for number, line in lines:
                start = start if pending else number
                pending += line
                if pending.endswith("\\"):
                    pending = pending[:-1]
                    continue
                words = tuple(shlex.split(pending, comments=True))
                pending = ""
                if words:
                    commands.append(Command(f"{path.relative_to(ROOT)}:{start}", words))
    return commands


def untagged_commands(files=DOCS) -> list[str]:
    """``file:line: text`` of the lines that read as commands in fenced blocks not tagged bash/sh (or python)."""
    found = []
    for path in files:
        for info, lines in _blocks(path):
            if info not in (*SHELLS, "python"):
                where = path.relative_to(ROOT)
                found += [f"{where}:{n}: {line.strip()}" for n, line in lines if COMMAND_START.match(line)]
    return found


def rules_for(command: Command) -> list[Rule]:
    return [rule for rule in RULES if rule.matches(command)]


def job_invocation(words) -> tuple[str, list[str]] | None:
    """``(job, overrides)`` of the first job call in ``words`` (``python jobs/<job>.py``, ``fcas <job>``,
    ``fcas-<job>``, ``python -m fcas <job>``; after a wrapper's ``--`` too), None when there is none."""
    words = list(words)
    for i, word in enumerate(words):
        script = re.fullmatch(r"jobs/(\w+)\.py", word)
        if script:
            return script.group(1), words[i + 1:]
        if (word == "fcas" or word.endswith("/bin/fcas")) and i + 1 < len(words):
            return words[i + 1], words[i + 2:]
        if word.startswith("fcas-") and word[len("fcas-"):] in JOBS:
            return word[len("fcas-"):], words[i + 1:]
        if word == "-m" and words[i + 1:i + 2] == ["fcas"] and i + 2 < len(words):
            return words[i + 2], words[i + 3:]
    return None


def make_recipe(target: str) -> list[tuple[str, ...]]:
    """The commands of a Makefile target's recipe, ``$(BIN)/`` read as ``.venv/bin/`` (the Makefile's VENV)."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    found = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", text, flags=re.M)
    assert found, f"Makefile has no recipe for {target!r}"
    return [tuple(shlex.split(line.replace("$(BIN)/", ".venv/bin/"))) for line in found.group(1).splitlines()]


def localized(words, tmp: Path) -> list[str]:
    """A run command's words for this machine: this environment's python or ``fcas``; outputs under ``tmp``."""
    first = {".venv/bin/python": sys.executable, "fcas": str(Path(sys.executable).parent / "fcas")}
    words = [first.get(words[0], words[0]), *words[1:]]
    return [re.sub(r"(?<==)(/tmp/|outputs/)", f"{tmp}/", word) for word in words]


# ---- a heavy command at the tiny preset ----------------------------------------------------------------------
# per job: the overrides that make it run in seconds (they replace a documented value of the same key)
TINY_OVERRIDES = {
    "prepare": {"preset": "tiny", "preview": "0"},
    "synthesize": {"preset": "tiny", "n": "2", "sampler.steps": "4", "progress": "false", "preview": "false"},
    "train_vae": {"preset": "tiny", "model": "tiny", "train.steps": "2", "train.checkpoint_every": "2",
                  "trainer.num_workers": "1", "trainer.progress": "false"},
    "train_tcdm": {"preset": "tiny", "model": "tiny", "train.steps": "2", "train.checkpoint_every": "2",
                   "trainer.num_workers": "1", "trainer.progress": "false"},
    "cache_latents": {"preset": "tiny", "model": "tiny", "progress": "false"},
    "pretrain_cal": {"preset": "tiny", "train.pretrain_steps": "2", "train.finetune_steps": "2",
                     "train.batch_size": "1", "trainer.num_workers": "1", "trainer.progress": "false"},
    "evaluate": {},
    "export_nnunet": {"folds": "2"},   # a 2-sample run cannot fill nnU-Net's 5 folds
}
# a prepared library keeps 10 cases, so that its 10 % template split is not empty; training reads 3
SCALE_DOWN = ((re.compile(r"^source=phantom:\d+$"), "source=phantom:10"),
              (re.compile(r"^data=phantom:\d+$"), "data=phantom:3"))
DROPPED = re.compile(r"^resources\.")   # a cluster's GPUs and actor counts: the local defaults instead


def tiny_invocation(job: str, overrides, tmp: Path, data: Path, s3_root: str, where: str) -> list[str]:
    """The overrides of ``job`` at the tiny preset: sizes scaled down (:data:`TINY_OVERRIDES`, :data:`SCALE_DOWN`),
    cluster resources dropped, ``outputs/`` and ``$PWD/outputs/`` under ``tmp`` (shared by the commands of one
    file, so a later command reads what an earlier one wrote), ``/data/...`` and ``dir:<relative>`` inputs
    under ``data``, and ``s3://<bucket>/`` under ``s3_root`` in a prefix of this command's own (a run on
    S3 is never a rerun of another command's). An output the command leaves to its default goes under ``tmp``."""
    own = re.sub(r"[^A-Za-z0-9]+", "-", where).strip("-").lower()
    values: dict[str, str] = {}
    for word in overrides:
        key, _, value = word.partition("=")
        if DROPPED.match(key):
            continue
        for pattern, repl in SCALE_DOWN:
            word = pattern.sub(repl, word)
        key, _, value = word.partition("=")
        value = re.sub(r"^(dir:)?(\$PWD/)?outputs/", lambda m: f"{m.group(1) or ''}{tmp}/", value)
        value = re.sub(r"^(dir:)?/data/", lambda m: f"{m.group(1) or ''}{data}/", value)
        value = re.sub(r"^dir:(?![/.$])", f"dir:{data}/", value)
        value = re.sub(r"^s3://[^/]+/", f"{s3_root}/{own}/", value)
        values[key] = value
    values.update(TINY_OVERRIDES[job])
    if "out" not in values:   # never the job's default under the repository
        values["out"] = f"{tmp}/{own}"
    return [f"{k}={v}" for k, v in values.items()]
