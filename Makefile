# make demo: a private Dovecot plus the proxy in front of it, on loopback.
# make test: installs what the tests need (apt and pip) and runs lint, types and the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := dovecot-core dovecot-imapd dovecot-pop3d curl fetchmail openssl ca-certificates systemd

.PHONY: demo test lint typecheck bench system-deps venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=compat
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $@

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

test: system-deps venv lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider

demo: system-deps venv
	$(BIN)/python -m scripts.demo

bench: system-deps venv
	$(BIN)/python -m bench.relay_fetch
	$(BIN)/python -m bench.idle_sessions
	$(BIN)/python -m bench.pop3_download

clean:
	rm -rf $(VENV) .demo build *.egg-info dropin.cache twisted/plugins/dropin.cache
