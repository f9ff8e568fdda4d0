# FCaS at scale — the two commands: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install bytecode demo test docs-check clean weights weights-tcdm weights-tcdm-mask-only tiny-checkpoint reproduce

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]" "$(TORCH)"
	touch $(STAMP)

install: $(STAMP)

# The main job on its embedded defaults: 8 demo samples -> outputs/<timestamp>/
# Bytecode of our own modules, written once: with PYTHONDONTWRITEBYTECODE=1 (as on these machines) Python
# never caches it, and every Ray worker and job process would compile fcas anew (about 0.5 s of CPU each).
bytecode:
	@$(BIN)/python -m compileall -q fcas jobs

demo: install bytecode
	$(BIN)/python jobs/synthesize.py

test: install bytecode
	$(BIN)/python -m pytest -q --durations=15 tests

# Only the documentation's commands (make test runs them too): the cheap ones as written, the heavy ones
# composed and run at the tiny preset in documented order (about 3 min on 2 cores)
docs-check: install
	$(BIN)/python -m pytest -q tests/test_docs_commands.py

# The VAE: one Ray Train worker of 1.75 CPUs (torch runs ceil = 2 threads) leaves a quarter CPU for the Ray Data
# tasks that stream the training cases; a worker of all 2 CPUs is refused (the stream could never be scheduled).
# The worker's buffer holds all 64 cases, so after the first pass nothing more is streamed. The VAE trains in
# bfloat16 autocast (train.amp, CPU too: a step 0.55x its fp32 time, the same held-out SSIM); the TCDMs stay fp32
# (bf16 scored pair SSIM 0.783 against 0.789 at 3500 steps: docs/benchmarks.md).
# Rebuild both demo checkpoints from scratch on phantoms, on 2 CPU cores (reruns resume from outputs/weights/):
# the VAE (32/64/64 channels, L1 + 0.5 SSIM + KL, cosine lr, 8000 bf16 steps of 32^3 crops: held-out SSIM 0.920,
# 30.1 dB), then the template-guided TCDM and the mask-only ablation at the same budget (3500 fp32 steps, cosine lr,
# EMA weights, one-hot mask channels) side by side, one core each (1.0-1.2 s a step each, against 0.6 s for one
# run on both cores: the pair finishes sooner than one after the other). The bundled TCDMs trained on 64 independent
# phantoms, random pairs (TCDM_DATA=phantom:64). `make weights TCDM_DATA=phantom:64/8` trains them in sites of 8
# (fcas.phantom.sites), each template from its target's site: over the whole volume the template then leads on
# every seed of three retrains, under the cardiac mask the two models tie (docs/benchmarks.md, "Sites").
# The time depends on the machine: the VAE stage took 56.9 min on one day and 102.8 and 124 min on others of the
# same kind (a step 0.4 s against 0.8 s, CPU steal; 0.73 s over the first 200 steps on 2026-12-06, about 97 min):
# `make weights` fits 2 hours only on a fast day. Rerunning it resumes where it stopped, and since the case
# buffer is filled in case-id order the same command draws the same batches (benchmarks/training_repeatability.py
# compares two tiny TCDM runs' weights: identical).
VAE_STEPS  ?= 8000
TCDM_STEPS ?= 3500
TCDM_DATA  ?= phantom:64
TCDM_ARGS   = preset=demo model=demo data=$(TCDM_DATA) vae=outputs/weights/vae condition.encoding=onehot \
              train.steps=$(TCDM_STEPS) train.lr=3e-4 train.schedule=cosine train.warmup_steps=200 train.ema_decay=0.998 \
              train.buffer_cases=64 train.checkpoint_every=500 train.keep_checkpoints=2 trainer.num_workers=1 \
              trainer.cpus_per_worker=0.9 trainer.progress=false
weights: install
	$(BIN)/python jobs/train_vae.py preset=demo model=demo 'model.vae.channels=[32,64,64]' data=phantom:64 \
	    out=outputs/weights/vae 'train.crop=[32,32,32]' train.steps=$(VAE_STEPS) train.batch_size=2 train.lr=1e-3 \
	    train.warmup_steps=200 train.ssim_weight=0.5 train.amp=true train.buffer_cases=64 train.checkpoint_every=500 \
	    train.keep_checkpoints=2 train.val_data=phantom:4@9000 \
	    trainer.num_workers=1 trainer.cpus_per_worker=1.75 trainer.progress=false
	$(MAKE) -j2 weights-tcdm weights-tcdm-mask-only
	$(BIN)/python -m fcas.models.export outputs/weights/tcdm checkpoints/demo
	$(BIN)/python -m fcas.models.export outputs/weights/tcdm-mask-only checkpoints/demo-mask-only
	$(BIN)/python benchmarks/vae_reconstruction.py --vae checkpoints/demo --json checkpoints/demo/vae_reconstruction.json

# The two TCDMs of `make weights` (each needs outputs/weights/vae); `make weights` runs them side by side.
weights-tcdm: install
	$(BIN)/python jobs/train_tcdm.py $(TCDM_ARGS) out=outputs/weights/tcdm
weights-tcdm-mask-only: install
	$(BIN)/python jobs/train_tcdm.py $(TCDM_ARGS) out=outputs/weights/tcdm-mask-only condition.mask_only=true

# Miniature reproduction of the paper's Tables 1, 3 and 4 on phantoms -> docs/results.md. From scratch on 2 CPU
# cores it took 1 h 09 min (measured 2026-12-04: Table 1 + oracles 4 min, synthesis 33 min, 9 segmentation arms
# 32 min in bf16 autocast, 2.7-4.6 min each); every stage is cached under outputs/reproduce-full/, so a rerun
# resumes where it stopped, and docs/results.md shows the seeds that have finished.
# The tiny-preset checkpoint (32^3 @ 4 mm) that the documented `preset=tiny` commands use: a plumbing
# model for tests and smoke runs, not for images (about 3 min on 2 CPU cores).
tiny-checkpoint: install
	$(BIN)/python jobs/train_vae.py preset=tiny model=tiny data=phantom:16 out=outputs/weights/vae-tiny \
	    train.steps=300 train.batch_size=2 train.lr=1e-3 train.checkpoint_every=300 \
	    trainer.num_workers=1 trainer.cpus_per_worker=1.75 trainer.progress=false
	$(BIN)/python jobs/train_tcdm.py preset=tiny model=tiny data=phantom:16 vae=outputs/weights/vae-tiny \
	    out=outputs/weights/tcdm-tiny train.steps=300 train.lr=3e-4 train.schedule=cosine train.warmup_steps=20 \
	    train.ema_decay=0.99 train.checkpoint_every=300 trainer.num_workers=1 trainer.cpus_per_worker=1.75 trainer.progress=false
	$(BIN)/python -m fcas.models.export outputs/weights/tcdm-tiny checkpoints/tiny

reproduce: install
	$(BIN)/python jobs/reproduce.py

clean:
	rm -rf outputs .pytest_cache
