"""Miniature reproduction of the paper's Tables 1, 3 and 4 on phantoms (``make reproduce``).

Stages, each cached as ``<work>/stages/<name>.json`` (a rerun loads it and skips the work; every
run and skip is appended to ``<work>/stage_log.jsonl`` with its seconds):

1. ``data``: the synthesis template library (``phantom:N`` prepared by the prepare job, split
   template / reference); the "real" segmentation cases are phantoms generated in memory from
   seeds ``real_offset ..`` (train) and ``real_offset + n_train ..`` (test), disjoint from the seeds
   the demo TCDM was trained on (0..23) and from the library.
2. ``table1_seed<s>``: held-out pairs ``(A, B)`` of test phantoms, direction B@A, sampled by the
   template-guided and the mask-only checkpoint with the same noise (drawn from ``(seed, pair)``);
   SSIM / RMSE against the true ``I_A`` over the whole volume and FID of the two sets on the
   project's own VAE-encoder features (:class:`fcas.metrics.fid.VAEEncoderFeatures`), with the
   real-vs-real FID floor at the same set size.
3. ``synthesis``: one synthesis run (template-guided checkpoint) shared by every seed.
4. ``seg_<arm>_seed<s>``: a segmentation net (:mod:`fcas.cal`, Ray-free loop) per arm and seed --
   ``real_only`` (the real train cases only, as many steps as pretraining + fine-tuning),
   ``cal`` (pretrain on the synthetic run with the confidence-aware loss, Eq. 9, then fine-tune)
   and ``plain`` (the same with the plain loss, Eq. 8) -- evaluated on the test cases (Dice and
   RDice per cardiac class).
5. the report: markdown tables (mean ± sd over seeds), PNG plots, configuration and stage timings.

The two stages that run Ray jobs (prepare, synthesize) are reached through :class:`Runners`
(``fcas.pipeline.reproduce`` wires the Ray jobs in); everything else runs in this process.
Modules: :mod:`.settings` (what a scale is), :mod:`.stages` (the stage cache), :mod:`.experiment` (the
stages themselves, :func:`run_reproduce`), :mod:`.report` (markdown and plots). Hand-written
orchestration; the science is in :mod:`fcas.diffusion`, :mod:`fcas.cal`, :mod:`fcas.metrics` and
:mod:`fcas.evaluation`.
"""
from fcas.reproduction.experiment import run_reproduce, sample_held_out_pairs, table1_seed, train_and_evaluate_seg
from fcas.reproduction.report import render_results, verdict
from fcas.reproduction.settings import ARMS, ReproduceSettings, Runners
from fcas.reproduction.stages import read_stage_log, run_stage, stage_key

__all__ = ["ReproduceSettings", "Runners", "ARMS", "run_reproduce", "sample_held_out_pairs", "table1_seed",
           "train_and_evaluate_seg", "render_results", "verdict", "read_stage_log", "run_stage", "stage_key"]
