# FCaS at scale — the two commands: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install demo test clean weights reproduce

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]" "$(TORCH)"
	touch $(STAMP)

install: $(STAMP)

# The main job on its embedded defaults: 8 demo samples -> outputs/<timestamp>/
demo: install
	$(BIN)/python jobs/synthesize.py

test: install
	$(BIN)/python -m pytest -q tests

# Reproduce the bundled demo checkpoint from scratch on phantoms (about 1 hour on 2 CPU cores;
# reruns resume from outputs/weights/).
weights: install
	$(BIN)/python jobs/train_vae.py preset=demo model=demo data=phantom:24 out=outputs/weights/vae 'train.crop=[32,32,32]' train.steps=400 train.batch_size=2 train.lr=1e-3 train.checkpoint_every=100 trainer.progress=false
	$(BIN)/python jobs/train_tcdm.py preset=demo model=demo data=phantom:24 vae=outputs/weights/vae out=outputs/weights/tcdm train.steps=500 train.lr=3e-4 train.checkpoint_every=100 train.keep_checkpoints=2
	$(BIN)/python -m fcas.models.export outputs/weights/tcdm checkpoints/demo

# Miniature reproduction of the paper's Tables 1, 3 and 4 on phantoms -> docs/results.md (estimated
# ~80 min on 2 CPU cores (79.5 min measured from scratch); every stage is cached under outputs/reproduce-full/, so a rerun resumes).
reproduce: install
	$(BIN)/python jobs/reproduce.py

clean:
	rm -rf outputs .pytest_cache
