"""Procedural contrast-enhanced cardiac CTA phantom: the bundled data of tests and ``make demo``.

:func:`make_case` draws one case from ``numpy.random.default_rng(seed)``: a CT image in HU and a
label map in the ids of ``configs/labels/cardiac.yaml`` on one grid, with a RAS+ affine (spacing on
the diagonal, volume centred on the origin). Array axes are the NIfTI (i, j, k) order: i runs to the
patient's right (+x), j to anterior (+y), k to superior (+z).

Anatomy is built in physical millimetres, so any (also anisotropic) spacing gives the same heart:

* ventricles in a heart frame whose long axis points left-anterior-inferior (about 45 deg):
  LV cavity as a truncated ellipsoid, LV myocardium as an offset shell around it (open at the valve
  plane), RV as a crescent against the septum with an outflow tract leading to the pulmonary valve;
* atria above/behind the valve plane (LA posterior, RA right), thin unlabelled atrial/RV walls;
* ascending aorta (LV outflow, going up) and pulmonary artery (RV outflow, going up-left-back in front
  of the aorta, with its bifurcation) as curved tubes (union of spheres along a spline);
* left (left main -> LAD + LCx, with diagonals / marginals) and right (RCA, marginals, PDA) coronary
  trees as thin tapering tubes projected onto the epicardial surface (outside myocardium and RV
  wall), each starting inside the aortic root; drawn last with the highest priority;
* surroundings: lungs with vessels, vertebral body, ribs, sternum (bone, cortical shell), chest
  wall and liver below the diaphragm (soft tissue), descending aorta, SVC, oesophagus, epicardial and
  mediastinal fat. Label 0 (background) marks tissue the schema has no class for: fat, RV and
  atrial walls, descending aorta, SVC, oesophagus, air outside the body.

Every surface is perturbed by a smooth random global warp plus per-structure low-frequency bumps
(sums of random plane waves: resolution independent). The image is a per-class HU table (drawn per
seed), blurred (partial volume) with correlated Gaussian noise, clipped to [-1024, 3071].

Connectivity is 26-connectivity throughout. Safety net: each single-component cardiac class keeps
its largest component and coronary components not touching the aorta are dropped;
``PhantomCase.info["fixed_voxels"]`` counts the voxels this moved (seeds 0..49 at 64^3: one voxel
on one seed, 0 on the others; over seeds 0..199 it acted on 4 seeds).

Modules: :mod:`~fcas.phantom.geometry` (random fields, surfaces, the grid), :mod:`~fcas.phantom.heart`,
:mod:`~fcas.phantom.vessels` (great vessels, coronaries), :mod:`~fcas.phantom.surroundings`,
:mod:`~fcas.phantom.intensities` (HU tables, scanner domains), :mod:`~fcas.phantom.image` (kernel,
noise), :mod:`~fcas.phantom.topology` (safety net, measurements) and :mod:`~fcas.phantom.case` (the
builder and its draw order).

Hand-written: neither MONAI nor any other library ships an anatomical heart phantom with coronaries.
"""
from fcas.phantom.case import PhantomCase, make_case
from fcas.phantom.geometry import phantom_affine
from fcas.phantom.intensities import DOMAINS, HU_MAX, HU_MIN  # noqa: F401  (public, outside __all__ as before)
from fcas.phantom.topology import SINGLE_COMPONENT, check_topology, class_volumes  # noqa: F401  (likewise)

__all__ = ["PhantomCase", "make_case", "DOMAINS", "phantom_affine", "class_volumes", "check_topology"]
