# Two commands: `make demo` and `make test`. Both set up .venv and the data when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install data browser postgres test lint demo bench-compress bench-search bench-refine bench-models bench-data bench-latency bench-workers bench-final bench-tasks bench-runtimes clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

data:
	@if [ ! -f $(FMNIST) ]; then \
	  echo "installing Debian package dataset-fashion-mnist"; \
	  $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null; } || \
	  { echo "cannot install Fashion-MNIST: run 'sudo apt-get install dataset-fashion-mnist'"; exit 1; }; \
	fi

# the report test renders the HTML in Debian's chromium (Playwright drives it; nothing downloaded)
browser:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  echo "installing Debian package chromium (for the report test)"; \
	  $(SUDO) apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q chromium >/dev/null; } || \
	  { echo "cannot install chromium: run 'sudo apt-get install chromium'"; exit 1; }; \
	fi

# the multi-worker tests start a throwaway PostgreSQL server (Debian's package) on 127.0.0.1
postgres:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  echo "installing Debian package postgresql (for the multi-worker tests)"; \
	  $(SUDO) apt-get install -y -q postgresql >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q postgresql >/dev/null; } || \
	  { echo "cannot install PostgreSQL: run 'sudo apt-get install postgresql'"; exit 1; }; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check autoslim tests benchmarks examples
	$(BIN)/ruff format --check autoslim tests benchmarks examples
	$(BIN)/lint-imports

test: $(STAMP) data browser postgres lint
	# pytest's exit 5 (nothing collected: a renamed folder, a bad testpaths) fails like any other
	AUTOSLIM_REQUIRE_BROWSER=1 AUTOSLIM_REQUIRE_POSTGRES=1 $(BIN)/pytest -q -n auto --dist worksteal --durations=15

demo: $(STAMP) data
	$(BIN)/autoslim search --budget 2MB

bench-compress: $(STAMP) data
	$(BIN)/python benchmarks/bench_compress.py

bench-search: $(STAMP) data
	$(BIN)/python benchmarks/bench_search.py

bench-refine: $(STAMP) data
	$(BIN)/python benchmarks/bench_refine.py

bench-models: $(STAMP) data
	$(BIN)/python benchmarks/bench_models.py

# its peak-RSS figures come from GNU time (Debian package time)
bench-data: $(STAMP) data
	@command -v /usr/bin/time >/dev/null 2>&1 || $(SUDO) apt-get install -y -q time >/dev/null
	$(BIN)/python benchmarks/bench_data.py

# two agent processes on loopback; ~45 min on 2 cores
bench-latency: $(STAMP) data
	$(BIN)/python benchmarks/bench_latency.py

# 1, 2 and 4 workers on a throwaway PostgreSQL server; ~45 min on 2 cores
bench-workers: $(STAMP) data postgres
	$(BIN)/python benchmarks/bench_workers.py

# autoslim's final front vs by hand, sensitivity-greedy and random search; hours on 2 cores
bench-final: $(STAMP) data
	$(BIN)/python benchmarks/bench_final.py

# segmentation (LR-ASPP on fashion-mnist-seg) against the by-hand pipeline; the detection example
bench-tasks: $(STAMP) data
	$(BIN)/python benchmarks/bench_tasks.py

# three searches (ONNX Runtime, OpenVINO, ExecuTorch XNNPACK) and their cross-timing
bench-runtimes: $(STAMP) data
	$(BIN)/python benchmarks/bench_runtimes.py

clean:
	rm -rf $(VENV) .pytest_cache studies/runs
