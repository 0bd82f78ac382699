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

.PHONY: run test lint unit sysdeps bench bench-quick bench-profile bench-dns soak clean

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

run: $(BIN)/kushi
	$(BIN)/kushi serve $(ARGS)

sysdeps:
	@bash scripts/ensure-packages.sh $(TEST_SYSPKGS)

lint: $(VENV)/.test-deps
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy --strict src
	$(BIN)/lint-imports

test: sysdeps lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

unit: $(VENV)/.test-deps
	$(BIN)/python -m pytest -q tests/unit $(PYTEST_ARGS)

bench: $(VENV)/.bench-deps
	@bash scripts/ensure-packages.sh $(BENCH_SYSPKGS)
	$(BIN)/python -m bench.run $(BENCH_ARGS)
	$(BIN)/python -m bench.tls_compare

bench-quick: $(VENV)/.bench-deps
	@bash scripts/ensure-packages.sh $(BENCH_SYSPKGS)
	$(BIN)/python -m bench.run --quick $(BENCH_ARGS)

bench-profile: $(VENV)/.bench-deps
	@bash scripts/ensure-packages.sh $(BENCH_SYSPKGS)
	$(BIN)/python -m bench.profile $(BENCH_ARGS)

# The resolver against main: cached-name cost, and request time with slow/lost DNS answers
# (root: network namespaces). OLD=REF compares with another git ref.
bench-dns: $(VENV)/.test-deps
	$(BIN)/python -m bench.resolver --old $(or $(OLD),main)
	$(BIN)/python -m bench.dns_faults --old $(or $(OLD),main)

soak: $(VENV)/.test-deps
	$(BIN)/python -m pytest -q -m soak --run-soak tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache test-artifacts
