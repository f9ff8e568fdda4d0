"""Per-sample plans: which template pair and which reference mask sample ``i`` uses.

Every draw of sample ``i`` comes from ``numpy.random.default_rng([run_seed, i, stream])``;
``stream`` separates the plan draw (0) from MGM's (1, 2, ... per try, see ``fcas.deform``) and
the sampler's noise (:func:`noise_seed`). Hand-written: nothing in MONAI or Ray plans samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fcas.io import manifest
from fcas.security import check_id

PLAN_STREAM = 0
NOISE_STREAM = 1_000_003  # far from MGM's per-try streams


@dataclass(frozen=True)
class CaseRef:
    case_id: str
    image_uri: str
    label_uri: str


@dataclass(frozen=True)
class TemplateLibrary:
    """Template pairs d_B (image + whole mask) and reference masks M_A (deformed by MGM).

    The paper's inference draws both from its template library (50 cases); a prepared manifest's
    ``reference`` split adds more reference masks. Without one, references are the templates.
    """

    templates: tuple[CaseRef, ...]
    references: tuple[CaseRef, ...]

    def __post_init__(self) -> None:
        if not self.templates:
            raise ValueError("template library is empty: the cases manifest has no 'template' split rows")

    @classmethod
    def from_manifest(cls, cases_uri: str, template_split: str = "template",
                      reference_split: str = "reference") -> "TemplateLibrary":
        uri = manifest.cases_uri(cases_uri)   # the file, or the cases.parquet in a folder given
        table = manifest.read_cases(uri, resolve=False)
        if not table.num_rows:
            raise ValueError(f"{cases_uri}: the cases manifest has no rows")
        for case_id in table.column("case_id").to_pylist():   # case ids name files downstream: plain names only
            check_id(case_id, f"case id in {cases_uri}")
        # files relative to the manifest's folder (a copied library reads where it is)
        rows = manifest.resolve_cases(table, uri).to_pylist()
        refs = {s: tuple(CaseRef(r["case_id"], r["image_uri"], r["label_uri"])
                         for r in sorted(rows, key=lambda r: r["case_id"]) if r["split"] == s)
                for s in (template_split, reference_split)}
        if not refs[template_split]:
            raise ValueError(f"{cases_uri}: no rows with split={template_split!r} to use as templates")
        return cls(refs[template_split], refs[reference_split] or refs[template_split])


def plan_sample(run_seed: int, sample_id: int, library: TemplateLibrary) -> dict:
    """The plan of one sample: template and reference choice, and the seeds of its later draws."""
    if sample_id < 0:
        raise ValueError(f"sample_id must be non-negative, got {sample_id}")
    rng = np.random.default_rng([run_seed, sample_id, PLAN_STREAM])
    t = library.templates[int(rng.integers(len(library.templates)))]
    r = library.references[int(rng.integers(len(library.references)))]
    return {
        "sample_id": int(sample_id),
        "seed": noise_seed(run_seed, sample_id),
        "template_id": t.case_id,
        "template_image_uri": t.image_uri,
        "template_label_uri": t.label_uri,
        "reference_id": r.case_id,
        "reference_label_uri": r.label_uri,
    }


def noise_seed(run_seed: int, sample_id: int) -> int:
    """Seed of the sampler's ``torch.Generator`` for this sample (63-bit, from (run_seed, id))."""
    return int(np.random.SeedSequence([run_seed, sample_id, NOISE_STREAM]).generate_state(1, np.uint64)[0] >> 1)
