# Task runner. The README's two commands are `make demo` and `make test`; both set
# up what they need first (virtual environment, offline data) and skip work already done.
PYTHON_BOOT ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= demo
STAMP := $(VENV)/.installed
DATA_STAMPS := data/raw/wordnet/.complete data/raw/tuxpaint_stamps/.complete data/raw/imagenet_sample/.complete

.PHONY: setup data demo run notebooks test test-fast bench env-file clean-runs

setup: $(STAMP) $(DATA_STAMPS)

# Reinstall only when pyproject.toml changes (pip itself skips what is already there).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (zsl)" >/dev/null
	touch $@

data: $(DATA_STAMPS)

# Order-only on the venv: a reinstall does not refetch the data.
$(DATA_STAMPS) &: | $(STAMP)
	$(PY) -m zsl_utils.data.assets

## The suite's main job: every numbered notebook, in order, on a parameter profile.
# Executed copies go to runs/demo/, figures to runs/demo/figures/: the committed files stay as they are.
demo: setup
	ZSL_FIGURES_DIR=$(CURDIR)/runs/demo/figures $(PY) -m zsl_utils run --profile demo

## Regenerate the committed notebooks' outputs (and figures/) from the demo profile.
notebooks: setup
	$(PY) -m jupytext --sync notebooks/[0-9][0-9]_*.py
	$(PY) tools/demo_outputs.py

run: setup
	$(PY) -m zsl_utils run --profile $(PROFILE)

## Unit tests and every notebook executed with its default parameters (nbval).
## The marked cells (# NBVAL_CHECK_OUTPUT) are compared with the committed outputs.
test: setup
	ZSL_FIGURES_DIR=$(CURDIR)/runs/test/figures $(PY) -m pytest --nbval-lax --nbval-current-env \
		--nbval-sanitize-with notebooks/nbval_sanitize.cfg tests notebooks

test-fast: setup
	$(PY) -m pytest -m "not slow" tests

bench: setup
	for script in benchmarks/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

env-file: $(STAMP)
	$(PY) tools/make_environment_yml.py

clean-runs:
	rm -rf runs
