"""Driver memory at plan time: the synthesis pipeline for n = 10^4 vs n = 10^7 samples (no sampling).

    python benchmarks/driver_memory.py [--small 10000] [--large 10000000] [--old-large 1000000] \
        [--json benchmarks/results/driver_memory.json]

Each figure is one fresh driver process (peak RSS, ``ru_maxrss``) that starts a local Ray, reads
the (empty) run's finished ids and builds the job's Ray Data pipeline up to the writer, exactly as
:func:`fcas.pipeline.synthesize.build_pipeline` does it, without executing it:

* **new**: the ids go to Ray as at most 1000 ``{start, stop}`` ranges, expanded in the plan tasks
  (finished ids are skipped there, from a sorted array);
* **old**: a list of one ``{"id": i}`` dict per sample built on the driver and handed to
  ``ray.data.from_items`` (what the job did before), at ``--old-large`` (10^7 needs ~3 GB).

The acceptance is new(large) / new(small) <= 1.2.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, numpy as np, ray
from fcas.pipeline.synthesize import SynthesisJob, build_pipeline
from fcas.synthesis.outputs import finished_ids
from fcas.synthesis.plan import CaseRef, TemplateLibrary
n, mode, out, ckpt = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
refs = tuple(CaseRef(f"c{i}", f"{out}/c{i}.nii.gz", f"{out}/c{i}-label.nii.gz") for i in range(16))
library = TemplateLibrary(refs[:4], refs[4:])
job = SynthesisJob(n=n, out=out, checkpoint=ckpt)
done = np.fromiter(sorted(finished_ids(out)), dtype=np.int64)
if mode == "new":
    ds = build_pipeline(job, library, done, digest="0" * 64)
else:
    todo = [i for i in range(n) if i not in set(done.tolist())]
    ds = ray.data.from_items([{"id": i} for i in todo], override_num_blocks=max(1, min(len(todo), 1000)))
print(json.dumps({"n": n, "mode": mode, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
ray.shutdown()
"""


def measure(n: int, mode: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run")
        proc = subprocess.run([sys.executable, "-c", CHILD, str(n), mode, out, str(ROOT / "checkpoints" / "tiny")],
                              capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"driver_memory: the n={n} {mode} driver failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--large", type=int, default=10_000_000)
    ap.add_argument("--old-large", type=int, default=1_000_000)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = [measure(a.small, "new"), measure(a.large, "new"), measure(a.small, "old"), measure(a.old_large, "old")]
    ratio_new = rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    ratio_old = rows[3]["peak_rss_mb"] / rows[2]["peak_rss_mb"]
    print("| driver | n | peak RSS (MB) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['n']:,} | {r['peak_rss_mb']:.0f} |")
    print(f"new: n={a.large:,} / n={a.small:,} = {ratio_new:.3f} (acceptance <= 1.2)")
    print(f"old: n={a.old_large:,} / n={a.small:,} = {ratio_old:.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "ratio_new": ratio_new, "ratio_old": ratio_old}, indent=1))


if __name__ == "__main__":
    main()
