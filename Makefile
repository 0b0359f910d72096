# The rig — two commands on a fresh Debian 12 machine, as root:
#   make run    run the HIL suites on the default (virtual) farm into reports/<run-id>/
#   make test   run the rig's own tests (unit tests + lint)
# Both install what they need first; re-running changes nothing.

VENV        ?= .venv
PYTHON      ?= python3
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.rig-installed
APT_STAMP   := $(VENV)/.rig-apt
# Debian packages the rig drives: the broker, the HSM for signing keys, capture.
# python3-venv so `python3 -m venv` works on a stock Debian python; gcc and mosquitto-dev
# (+ libmosquitto-dev, libssl-dev) to build the broker's client-id plugin (rig/cloud/mosquitto_plugin/).
RMAKER_CLI  := esp-rainmaker-cli==1.14.1
# Test modules run in parallel, one module per worker (module fixtures stay in one process):
# most of their time is spent waiting on virtual boards, brokers and subprocesses, so 4 workers
# keep 2 cores about 70 % busy. Virtual boards of parallel modules lease distinct addresses
# (rig/boards/address_lease.py), so their names may derive the same one.
TEST_WORKERS ?= 4
APT_PACKAGES := mosquitto softhsm2 tcpdump python3-venv gcc libc6-dev mosquitto-dev libmosquitto-dev libssl-dev

.PHONY: install test run lint clean

install: $(APT_STAMP) $(STAMP)

$(APT_STAMP): Makefile
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@mkdir -p $(VENV) && touch $@

$(STAMP): pyproject.toml | $(APT_STAMP)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# Espressif's own provisioning client, to cross-check rig.protocomm and the virtual node
	# (tests only). --no-deps: its CLI pulls opencv/aiortc/boto3, which rmaker_tools does not use.
	$(BIN)/python -m pip install -q --no-deps '$(RMAKER_CLI)'
	@touch $@

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest tests -q -n $(TEST_WORKERS) --dist loadfile

run: install
	$(BIN)/rig run

clean:
	rm -rf $(VENV) .rig
