# make demo: a private Dovecot plus the proxy in front of it, on loopback (DEMO_DIR, default .demo, and
#   DEMO_IMAP_PORT, DEMO_IMAPS_PORT, DEMO_POP3_PORT, default 10143, 10993, 10110, choose where).
# make test: installs what the tests need (apt and pip) and runs lint, types and the whole suite.
# make bench: the benchmark (bench/summary.py) against direct Dovecot, nginx's mail proxy and haproxy (TCP).
# make bench-instructions: instructions per relayed FETCH, per login and per mixed-load round under callgrind (bench/instructions.py).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# python3-venv: stock Debian's python3 has no ensurepip without it, so `python3 -m venv` fails
# postgresql and haproxy: the tests run private instances of their own (tests/postgres.py,
# tests/test_multihost.py), never the system's.
APT_PACKAGES := python3-venv dovecot-core dovecot-imapd dovecot-pop3d curl fetchmail openssl ca-certificates systemd fail2ban postgresql haproxy slapd ldap-utils
BENCH_APT_PACKAGES := nginx libnginx-mod-mail haproxy
BENCH_ARGS ?=

.PHONY: demo demo-oauth test lint typecheck bench bench-instructions bench-deps fuzz system-deps venv-deps venv clean

venv: $(VENV)/.installed

# A plain (PEP 660) editable install: setup.py's package_dir makes it a static .pth, which twistd's plugin scan sees.
$(VENV)/.installed: setup.py pyproject.toml | venv-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/twistd mailproxy --version
	touch $@

# $(call apt_install,PACKAGES): apt-get install those not installed yet
define apt_install
@missing=""; for p in $(1); do \
  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
done; \
if [ -n "$$missing" ]; then \
  echo "installing:$$missing"; \
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
fi
endef

system-deps:
	$(call apt_install,$(APT_PACKAGES))

# Before the venv is made (make venv, lint, ...): python3-venv, only where `python3 -m venv` needs it.
venv-deps:
	@$(PYTHON) -c "import ensurepip" 2>/dev/null || $(MAKE) --no-print-directory system-deps APT_PACKAGES=python3-venv

# the benchmark's peers, nginx's mail proxy and haproxy (make test does not need them)
bench-deps:
	$(call apt_install,$(BENCH_APT_PACKAGES))

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

test: system-deps venv lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider

demo: system-deps venv
	$(BIN)/python -m scripts.demo

# the OAuth 2.0 flow on loopback: an OAuth-only Dovecot, the tests' authorization server, mailproxy-oauth authorize
demo-oauth: system-deps venv
	$(BIN)/python -m scripts.oauth_demo

# one summary table: direct Dovecot | mailproxy w=1 | w=N | nginx mail | haproxy (BENCH_ARGS=--quick for a short run)
bench: system-deps bench-deps venv
	$(BIN)/python -m bench $(BENCH_ARGS)

# the same code counts the same instructions whatever the machine's load: for comparing changes
bench-instructions: system-deps venv
	$(call apt_install,valgrind)
	$(BIN)/python -m bench.instructions

# coverage-guided fuzzing with atheris (FUZZ_SECONDS, default 60; crashes land in ./crash-*)
fuzz: venv
	$(BIN)/pip install -q -e '.[fuzz]'
	$(BIN)/python -m scripts.fuzz_atheris -max_total_time=$${FUZZ_SECONDS:-60}

clean:
	rm -rf $(VENV) .demo build *.egg-info dropin.cache twisted/plugins/dropin.cache
