# vaporproxy — the two commands a newcomer needs:
#   make run    install what is missing, start a demo VM and the proxy, print the console URL
#               (DEMO_ARGS="--extra-config my.yaml --port 8090": see python3 -m vaporproxy.demo --help)
#   make test   install what is missing, run the whole suite with trial
# Both work on a fresh Debian 12 machine as root (apt-get and pip are used).

PYTHON      ?= python3
TRIAL       ?= $(PYTHON) -m twisted.trial
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

APT_PACKAGES = libvirt-dev pkg-config libvirt-daemon libvirt-daemon-driver-qemu \
               libvirt-clients qemu-system-x86 redis-server chromium spice-html5 \
               socat openssl procps util-linux
APT_PACKAGES += systemd   # systemd-analyze verify (tests/test_systemd_unit.py); offline, starts nothing
STAMPS       = .stamps

.PHONY: run test test-unit test-integration test-e2e bench bench-quick deps lock clean

run: deps
	$(PYTHON) -m vaporproxy.demo $(DEMO_ARGS)

test: deps
	bash scripts/run-tests.sh $(TESTS)

test-unit: deps
	$(TRIAL) $$(find tests -name 'test_*.py' -not -path 'tests/integration/*' -not -path 'tests/e2e/*' | sed 's,/,.,g;s,\.py$$,,')

test-integration: deps
	$(TRIAL) tests.integration

test-e2e: deps
	$(TRIAL) tests.e2e

bench: deps $(STAMPS)/bench
	$(PYTHON) bench/run.py

bench-quick: deps $(STAMPS)/bench
	$(PYTHON) bench/run.py --quick

deps: $(STAMPS)/apt $(STAMPS)/pip $(STAMPS)/npm

$(STAMPS)/apt: Makefile
	@mkdir -p $(STAMPS)
	@if dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
	    echo "apt: all packages present"; \
	else \
	    echo "apt: installing $(APT_PACKAGES)"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	        --no-install-recommends $(APT_PACKAGES); \
	fi
	@touch $@

# The exact tested set (runtime + test), versions and hashes; the checkout itself
# runs from PYTHONPATH.  "make lock" refreshes it from requirements*.txt.
$(STAMPS)/pip: requirements.lock $(STAMPS)/apt
	@mkdir -p $(STAMPS)
	$(PYTHON) -m pip install -q --disable-pip-version-check --require-hashes -r requirements.lock
	@touch $@

lock:
	$(PYTHON) -m pip install -q --disable-pip-version-check pip-tools
	$(PYTHON) -m piptools compile --quiet --upgrade --generate-hashes --allow-unsafe --strip-extras \
	    --no-emit-index-url --no-emit-find-links -o requirements.lock requirements.txt requirements-test.txt

$(STAMPS)/npm: package.json $(STAMPS)/apt
	@mkdir -p $(STAMPS)
	npm ci --no-audit --no-fund --loglevel=error || npm install --no-audit --no-fund --loglevel=error
	@touch $@

$(STAMPS)/bench: $(STAMPS)/pip
	$(PYTHON) -m pip install -q --disable-pip-version-check websockify==0.13.0 numpy
	@dpkg -s valgrind >/dev/null 2>&1 || (apt-get update -q && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -q --no-install-recommends valgrind)
	@touch $@

clean:
	rm -rf $(STAMPS) _trial_temp* node_modules build *.egg-info
