# kushi: the two set-up commands are `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# System packages the tests drive for real (curl as the client, ip for namespaces,
# haproxy for the scale-out case, chromium for the status page and PAC tests, openssl,
# calamaris to read the Squid-format access log as Squid log tools do, systemd for
# systemd-analyze on the unit, util-linux for setpriv and unshare, netcat-openbsd for
# `nc -X 5`, the SOCKS5 client ssh users put in ProxyCommand, tayga as the NAT64
# translator in front of an IPv4-only origin).
TEST_SYSPKGS  := curl iproute2 haproxy chromium openssl calamaris systemd util-linux netcat-openbsd tayga
BENCH_SYSPKGS := wrk apache2-utils nginx-light squid tinyproxy curl

# The .venv holds kushi as an editable install: pure Python, running from src/. The
# mypyc-compiled form (the wheel that `pip install .` builds, see pyproject.toml) is built
# from a copy of the tree and unpacked into build/compiled; PYTHONPATH=build/compiled runs
# it. `make run` and the benchmarks run it; `make test` runs the tests on both.
COMPILED := build/compiled
KUSHI_FILES := $(shell find src/kushi -type f -not -path '*/__pycache__/*' -not -name '*.so')
export HATCH_BUILD_NO_HOOKS := true

.PHONY: run test lint unit sysdeps compiled bench bench-quick bench-profile bench-dns soak clean

$(BIN)/kushi: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test-deps: pyproject.toml $(BIN)/kushi
	$(BIN)/pip install -q -e '.[test]'
	touch $@

$(VENV)/.bench-deps: pyproject.toml $(VENV)/.test-deps
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $@

$(COMPILED)/.built: pyproject.toml README.md LICENSE $(KUSHI_FILES) | $(BIN)/kushi
	@rm -rf build/wheel-src build/wheel $(COMPILED)
	@mkdir -p build/wheel-src
	@cp -r pyproject.toml README.md LICENSE .gitignore src build/wheel-src/
	@find build/wheel-src \( -name '*.so' -o -name '*.pyc' \) -delete
	HATCH_BUILD_NO_HOOKS=false $(BIN)/pip wheel -q --no-deps -w build/wheel build/wheel-src
	$(BIN)/pip install -q --no-deps --target $(COMPILED) build/wheel/kushi-*.whl
	@touch $@

compiled: $(COMPILED)/.built

# Without a C compiler the build fails: kushi then runs from source, as it says.
run: $(BIN)/kushi
	@$(MAKE) --no-print-directory compiled || \
	  echo "make run: the mypyc build failed (above); kushi runs as pure Python"
	@if [ -f $(COMPILED)/.built ]; then export PYTHONPATH=$(CURDIR)/$(COMPILED); fi; \
	  exec $(BIN)/kushi serve $(ARGS)

sysdeps:
	@bash scripts/ensure-packages.sh $(TEST_SYSPKGS)

lint: $(VENV)/.test-deps
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy --strict src
	$(BIN)/lint-imports

test: sysdeps lint compiled
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
	KUSHI_COMPILED=1 PYTHONPATH=$(CURDIR)/$(COMPILED) \
	  $(BIN)/python -m pytest -q tests/unit tests/integration $(PYTEST_ARGS)

unit: $(VENV)/.test-deps
	$(BIN)/python -m pytest -q tests/unit $(PYTEST_ARGS)

# kushi as it is installed: the compiled form (PYTHONPATH reaches every kushi started).
bench: $(VENV)/.bench-deps compiled
	@bash scripts/ensure-packages.sh $(BENCH_SYSPKGS)
	PYTHONPATH=$(CURDIR)/$(COMPILED) $(BIN)/python -m bench.run $(BENCH_ARGS)
	PYTHONPATH=$(CURDIR)/$(COMPILED) $(BIN)/python -m bench.tls_compare

bench-quick: $(VENV)/.bench-deps compiled
	@bash scripts/ensure-packages.sh $(BENCH_SYSPKGS)
	PYTHONPATH=$(CURDIR)/$(COMPILED) $(BIN)/python -m bench.run --quick $(BENCH_ARGS)

bench-profile: $(VENV)/.bench-deps compiled
	@bash scripts/ensure-packages.sh $(BENCH_SYSPKGS)
	PYTHONPATH=$(CURDIR)/$(COMPILED) $(BIN)/python -m bench.profile $(BENCH_ARGS)

# The resolver against main: cached-name cost, and request time with slow/lost DNS answers
# (root: network namespaces). OLD=REF compares with another git ref.
bench-dns: $(VENV)/.test-deps
	$(BIN)/python -m bench.resolver --old $(or $(OLD),main)
	$(BIN)/python -m bench.dns_faults --old $(or $(OLD),main)

soak: $(VENV)/.test-deps
	$(BIN)/python -m pytest -q -m soak --run-soak tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache test-artifacts
	rm -f src/*__mypyc*.so src/kushi/*.so  # left by `pip install .` in this tree
