# Axon: `make demo` and `make test` set everything up from nothing (venv, CPU torch, the five packages, data).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# every folder with a pyproject.toml is a package; all but shared are paper packages, each with `<package>.cli demo`
PACKAGES := $(patsubst %/pyproject.toml,%,$(wildcard */pyproject.toml))
PAPERS := $(filter-out shared,$(PACKAGES))
export AXON_DATA ?= $(HOME)/.cache/axon
# CPU threads for the 2-core reference machine; override on bigger machines.
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export MPLBACKEND := Agg

.PHONY: install data test lint demo bench mutation clean

$(VENV)/.installed: $(foreach p,$(PACKAGES),$(p)/pyproject.toml)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the CPU wheel first: an unpinned torch would pull a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0
	# compat editable mode puts each project folder on sys.path, so `import x_llama` from the repository root finds
	# the package and not the bare folder x_llama/ (which Python would otherwise take as a namespace package)
	$(PIP) install -q --config-settings editable_mode=compat $(foreach p,$(PACKAGES),-e '$(p)[test]')
	touch $@

install: $(VENV)/.installed

data: install
	$(VENV)/bin/axon-data prepare all

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: data lint
	$(VENV)/bin/pytest -q

demo: data
	rm -rf runs/demo && mkdir -p runs/demo
	$(VENV)/bin/axon-data list --markdown > runs/demo/datasets.md
	@for p in $(PAPERS); do echo "== $$p demo"; $(PY) -m $$p.cli demo || exit 1; done
	$(PY) -m axon_shared.report runs/demo
	@echo "report: runs/demo/REPORT.md"

bench: install
	@for b in benchmarks/*_bench.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# mutation testing (cosmic-ray) of the modules that implement the papers' equations: a seeded sample of 200 mutants per
# module (~1 hour on 2 cores; MUTATION_SAMPLE= runs every mutant, many hours); resumes; not run by CI
MUTATION_SAMPLE ?= 200
mutation: data
	$(PY) tests/mutation.py --out_dir runs/mutation --jobs 2 $(if $(MUTATION_SAMPLE),--sample $(MUTATION_SAMPLE))

clean:
	rm -rf $(VENV) runs .pytest_cache
