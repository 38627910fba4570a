# The README's two commands are `make demo` and `make test`; both set up what they need first.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.keye-setup-stamp
PKGS   := keye-dsa keye-vision keye-moe keye-train keye-agents
export TRITON_INTERPRET ?= 1

.PHONY: setup demo test lint format bench test-standalone clean

setup: $(STAMP)

$(STAMP): tools/setup.sh constraints.txt $(wildcard packages/*/pyproject.toml)
	bash tools/setup.sh
	touch $@

demo: setup
	$(PY) tools/demo.py

test: setup lint
	$(PY) -m pytest -q tools/tests $(addsuffix /tests,$(addprefix packages/,$(PKGS)))

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# A package alone in a fresh venv (torch first, then only what it declares): PKG=keye-dsa by default.
PKG ?= keye-dsa
test-standalone:
	bash tools/test_standalone.sh $(PKG)

bench: setup
	@echo "Benchmarks need a CUDA GPU: see BENCHMARKS.md and packages/*/benchmarks/."

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
