# The two entry points the README opens with. Both create .venv on first use and reuse it after.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: demo test reliability install lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[all,dev]"
	@# Browser tests drive Debian's Chromium; install it where we may (root with apt), as CI is.
	@if ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; fi
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/retinaedge demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

reliability: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_reliability.py --runslow
	@echo "report: reports/reliability.md"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean:
	rm -rf runs .pytest_cache
