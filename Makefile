# The two entry points the README opens with. Both create .venv on first use and reuse it after.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: demo test reliability install lint clean web

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[all,dev]"
	@# Browser tests drive Debian's Chromium; install it where we may (root with apt), as CI is.
	@if ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; fi
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP) web
	$(BIN)/retinaedge demo $(ARGS)

test: $(STAMP) web
	$(BIN)/python -m pytest -q $(ARGS)

reliability: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_reliability.py --runslow
	@echo "report: reports/reliability.md"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# The offline web app (web/ -> web/dist, served by the companion server at /app/): npm ci from the lockfile, a type
# check and an esbuild bundle, rebuilt only when its sources change.
WEB_SOURCES := $(wildcard web/src/*) web/build.mjs web/tsconfig.json
web/node_modules/.ci-stamp: web/package.json web/package-lock.json
	cd web && npm ci --no-audit --no-fund --loglevel=error
	touch $@

web/.build-stamp: web/node_modules/.ci-stamp $(WEB_SOURCES)
	cd web && npx tsc --noEmit -p . && node build.mjs
	touch $@

web: web/.build-stamp

clean:
	rm -rf runs .pytest_cache
