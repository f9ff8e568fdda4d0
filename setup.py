"""Package layout (the rest of the metadata is in pyproject.toml): the fcas code, and as package data the
repository's configs/, checkpoints/ (the small bundled ones, ~23 MB) and benchmarks/results/*.json, shipped
inside the wheel as fcas/configs/, fcas/checkpoints/, fcas/benchmarks/results/ without moving the folders
(fcas.bundled finds them either way). pyproject.toml cannot add mapped data folders to a found package list.
"""
from setuptools import find_packages, setup

DATA_DIRS = {"fcas.configs": "configs", "fcas.checkpoints": "checkpoints",
             "fcas.benchmarks.results": "benchmarks/results"}

setup(
    packages=find_packages(include=["fcas", "fcas.*"]) + list(DATA_DIRS),
    package_dir=DATA_DIRS,
    package_data={"fcas.configs": ["**/*.yaml"], "fcas.checkpoints": ["*/*"], "fcas.benchmarks.results": ["*.json"]},
    include_package_data=False,   # exactly the globs above (no MANIFEST.in, no stray files of the folders)
)
