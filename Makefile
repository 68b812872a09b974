# The course's commands. `make book` and `make test` each do all the set-up they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Per-cell limit for notebooks run under nbval: it catches hangs. The 60 s budget of a
# solution is measured by `make bench`.
CELL_TIMEOUT ?= 300
# The tests run in this many processes (pytest-xdist), each test file (and each notebook) in one of
# them: much of a test's time is spent waiting on kernels, graders and the browser. Each process,
# and each kernel it starts, computes on one thread (OMP_NUM_THREADS=1): two processes with two
# threads each on two cores make PyTorch's thread pool wait on descheduled threads, many times
# slower (a Lab 1a cell ran past its 300 s limit that way).
TEST_WORKERS ?= 2

.PHONY: setup vendor book test bench labs clean autograder schemas

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

# Local copies of the site's JavaScript (mermaid, require.js, the ipywidgets embed manager),
# taken from their npm packages, so that the site needs no CDN.
vendor: _vendor/.complete

_vendor/.complete: scripts/vendor-js.sh
	bash scripts/vendor-js.sh _vendor

# --all: Sphinx copies html_extra_path (the vendored JavaScript) only on a full write.
# Chapters are still executed only when they change (jupyter-cache).
book: setup vendor
	$(VENV)/bin/jupyter-book build . --all -W -n --keep-going

labs: setup
	$(PY) -m labkit.make_labs

test: book
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --nbval-lax \
		--nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout=$(CELL_TIMEOUT) solutions tests

bench: setup
	$(PY) -m labkit.bench solutions --nn

clean:
	rm -rf _build _vendor

# A Gradescope autograder for one lab: _build/autograder/<LAB>/ and _build/autograder/autograder-<LAB>.zip
# (see the bundle's README.md). A private set of hidden checks: make autograder LAB=01a HIDDEN=dir
LAB ?= 01a
autograder: setup
	$(PY) -m labkit.autograder --lab $(LAB) --out _build/autograder $(if $(HIDDEN),--hidden $(HIDDEN))

# The schemas of the checks' outputs (labkit/checks/schemas/), which the grader holds records to: the
# structure of each solution's outputs, widened over two seeds. Rerun after changing a check's collect.
schemas: setup
	for nb in solutions/*.ipynb; do lab=$$(basename $$nb | cut -d- -f1); rm -f labkit/checks/schemas/$$lab.json; \
		for seed in 0 1; do $(PY) -m labkit.grade $$nb --lab $$lab --seed $$seed --write-schema \
			--out _build/schemas/$$seed || exit 1; done; done
