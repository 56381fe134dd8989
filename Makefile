# One entry point for people and CI. `make demo` and `make test` work on a fresh machine with Python 3.11.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel of torch 2.13 is what the build machines carry; pinning it first keeps pip from
# pulling a multi-GB CUDA build to satisfy the range in pyproject.toml.
TORCH  ?= torch==2.13.0
DATA   ?= .dpo-data
# Test processes (pytest-xdist): one module's waits on its API and worker processes overlap another
# module's work. A module stays on one runner, so its module-scoped service is started once.
JOBS   ?= 2

.PHONY: install test test-fast demo serve clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[worker,test]"
	touch $@

# Tests marked `timing` compare measured seconds with an estimate: they run after the others, alone on
# the machine, so that no other test's load skews them. Both runs always go; either failing fails `make test`.
test: install
	status=0; \
	$(PY) -m pytest -q --timeout=900 -n $(JOBS) --dist loadfile --durations=20 -m "not timing" || status=$$?; \
	$(PY) -m pytest -q --timeout=900 -m timing || status=$$?; \
	exit $$status

test-fast: install
	$(PY) -m pytest -q -m "not slow" -n $(JOBS) --dist loadfile

demo: install
	$(PY) -m service.demo --data-dir $(DATA)/demo

serve: install
	$(VENV)/bin/dpo-service up --data-dir $(DATA)

clean:
	rm -rf $(VENV) $(DATA) .pytest_cache
