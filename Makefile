# The two commands of the README. Both set everything up first (idempotent: a stamp file skips reinstalls).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= all

.PHONY: run test lint format bench gpu-bench torch-range publish study publish-study

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[pipeline,lightning,huggingface,dev]"
	touch $(STAMP)

# DSD_PREFORK=1: the embedded pipeline's short CPU jobs run in children of a warm interpreter (dsd.prefork)
run: $(STAMP)
	DSD_PREFORK=1 $(BIN)/snakemake --cores $(CORES)
	$(BIN)/snakemake --report results/report.html

# After a `make run`: copy its tables and plots to results/published/ (committed; update PROVENANCE.md there),
# and write the results table and the sentences about it (generated from the table) into the README. A second
# run's comparison (results/published/second_run/, see PROVENANCE.md) belongs to the run it was compared with,
# so it is dropped here.
publish:
	test -f results/tables/paper_comparison.csv || { echo "make: run 'make run' first"; exit 1; }
	rm -rf results/published/tables results/published/plots results/published/second_run
	mkdir -p results/published
	cp -r results/tables results/plots results/published/
	$(BIN)/python -m dsd readme --tables results/published/tables --readme README.md

# The verdicts with 10 seeds: the same pipeline and folders with seeds 0-9 (a finished `make run`'s three seeds
# are reused, so this trains seeds 3-9); its tables are kept in results/study/. A second study's
# comparison (results/published/second_study/) belongs to the study it was compared with: publish-study drops it.
study: $(STAMP)
	DSD_PREFORK=1 $(BIN)/snakemake --cores $(CORES) --config 'seeds=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]'
	rm -rf results/study && cp -r results/tables results/study

publish-study:
	test -f results/study/paper_comparison.csv || { echo "make: run 'make study' first"; exit 1; }
	rm -rf results/published/study results/published/second_study && cp -r results/study results/published/study
	$(BIN)/python -m dsd readme --section study --tables results/published/study --readme README.md

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py

# On a CUDA machine: the paper's vision rows, a few hundred steps each (benchmarks/gpu_bench.py)
gpu-bench: $(STAMP)
	$(BIN)/python benchmarks/gpu_bench.py

# The core library's tests on other torch versions than the pin, each in a throwaway venv of a few GB
# (benchmarks/torch_range.sh): `make torch-range TORCH="2.3.1 2.13.0"`; the default is the lowest allowed
torch-range:
	benchmarks/torch_range.sh $(TORCH)

# one worker per core (pytest-xdist), a test file per worker at a time (module fixtures built once)
test: $(STAMP)
	@$(BIN)/python -c "import shutil, tempfile as t; d = t.gettempdir(); f = shutil.disk_usage(d).free / 2**30; print(f'make test: {f:.0f} GiB free under {d}; the suite writes up to ~7 GiB there at once' + (' (too little: expect write errors)' if f < 8 else ''))"
	$(BIN)/python -m pytest -q -n auto --dist loadfile --durations=15

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .
