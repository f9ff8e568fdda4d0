# FCaS at scale — the two commands: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install demo test clean weights

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]" "$(TORCH)"
	touch $(STAMP)

install: $(STAMP)

# Until the synthesis job lands, the main job is `prepare` on the bundled phantoms.
demo: install
	$(BIN)/python jobs/prepare.py source=phantom:8 preset=demo out=outputs/demo
	@echo "demo: outputs/demo/{cases/,cases.parquet,rejects.parquet,preview.png}"

test: install
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf outputs .pytest_cache
