# Two commands do everything on a fresh machine:
#   make demo   installs binllm into .venv, then runs the embedded demo job (jobs/demo.py) with the
#               demo preset (cluster/presets/demo_cpu.yaml: the paper's ML-1M protocol, CPU-sized)
#   make test   installs binllm with its test extras into .venv, then runs the whole test suite (what CI runs),
#               two test modules at a time (pytest-xdist, --dist loadfile: a module keeps its one Ray cluster),
#               in collection order, where tests/conftest.py puts the long run_first module first
#   make test-fast    the unit tier only: no Ray, no S3 server, no LLM (tests/conftest.py sets the tiers)
#   make reliability  runs the tests marked reliability(...) and writes docs/RELIABILITY.md from them
# torch is installed first, pinned by constraints.txt, so that nothing pulls a CUDA build onto a CPU
# machine. Where pip would find only the CUDA wheel, pass the CPU index, e.g.
#   make demo TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.binllm-installed

.PHONY: demo test test-fast reliability install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m jobs.demo --config ray_config.yaml --config cluster/presets/demo_cpu.yaml $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration and not model" $(PYTEST_ARGS)

reliability: $(STAMP)
	BINLLM_RELIABILITY_REPORT=docs/RELIABILITY.md $(PY) -m pytest -q -m reliability $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
