# The README's two commands are `make demo` and `make test`; both set up what they need first.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.keye-setup-stamp
PKGS   := keye-dsa keye-vision keye-moe keye-train keye-agents

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

# CPU benchmarks run anywhere, the GPU ones only with CUDA; each prints a table and writes JSON (its --out).
CPU_BENCH := packages/keye-vision/benchmarks/bench_video.py packages/keye-agents/benchmarks/bench_runtime.py
GPU_BENCH := packages/keye-dsa/benchmarks/bench_dsa.py packages/keye-moe/benchmarks/bench_moe.py \
             packages/keye-vision/benchmarks/bench_vit.py packages/keye-train/benchmarks/bench_train_step.py
bench: setup
	@for script in $(CPU_BENCH); do echo "== $$script"; $(PY) $$script || exit 1; done
	@if $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
	  for script in $(GPU_BENCH); do echo "== $$script"; $(PY) $$script || exit 1; done; \
	else echo "no CUDA GPU: skipped $(GPU_BENCH)"; fi

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
