# roomcast — the two commands: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test web proto browser lint typecheck bench clean

run: $(STAMP) web proto ## install, build the web assets, start `roomcast serve`
	$(BIN)/roomcast serve $(ARGS)

test: $(STAMP) web proto browser ## the whole test suite
	$(BIN)/pytest $(PYTEST_ARGS)

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("roomcast needs Python 3.11+") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

web: ## the chat page's assets (Socket.IO client from the npm registry)
	bash scripts/build-web.sh

proto: $(STAMP) ## gRPC stubs generated from proto/
	@if [ -f scripts/build-proto.sh ]; then bash scripts/build-proto.sh $(BIN)/python; fi

browser: ## Debian's chromium for the browser tests
	@command -v chromium >/dev/null 2>&1 || bash scripts/install-chromium.sh

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy

bench: $(STAMP) web proto ## the benchmarks in bench/ (writes docs/benchmarks.md)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) node_modules bench/node/node_modules src/roomcast/web/vendor build *.egg-info
