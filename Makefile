# Set-up and entry points. `make demo` and `make test` work on a fresh machine: each builds
# the virtual environment first (uv, Python 3.11, every version pinned by requirements.lock).
# Bytecode is compiled at install time: every job is a fresh Python process, and compiling
# torch's sources each time (where PYTHONDONTWRITEBYTECODE is set) costs seconds per job.
PYTHON ?= python3
VENV ?= .venv
CORES ?= 2
# pip's configured find-links folder (where a local torch wheel may sit); uv ignores pip's config.
FIND_LINKS ?= $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
UV_FLAGS = $(if $(FIND_LINKS),--find-links $(FIND_LINKS))
BIN = $(VENV)/bin

.PHONY: setup demo test test-fast lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(PYTHON) -m uv venv --quiet --allow-existing -p 3.11 $(VENV)
	$(PYTHON) -m uv pip install --quiet --compile-bytecode --python $(VENV)/bin/python $(UV_FLAGS) -c requirements.lock -e ".[dev]"
	touch $@

demo: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --profile profiles/local --cores $(CORES)

test: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -n $(CORES) --dist loadgroup --durations=15

lint: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --lint

clean:
	rm -rf results .snakemake
