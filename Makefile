# crashcart: `make demo` runs the kit's main job on a local default; `make test` runs the suite.
# Both install what they need first (pipenv, the Python deps, Node tools, Debian packages, checkov).

SHELL := /bin/bash
export PIPENV_VENV_IN_PROJECT := 1
export PIPENV_NOSPIN := 1
export PIPENV_YES := 1
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 20
export CHECKPOINT_DISABLE := 1

DEBIAN_PACKAGES := ntfs-3g libhivex-bin mtools dosfstools jq curl openssl xxd clang lld chromium gdisk ldmtool
CHECKOV_VERSION := 3.3.30
PIPENV := $(shell command -v pipenv 2>/dev/null || echo python3 -m pipenv)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test debian python node checkov clean

setup: debian python node checkov

debian:
	@dpkg -s $(DEBIAN_PACKAGES) >/dev/null 2>&1 || { \
	  $(SUDO) apt-get install -y --no-install-recommends $(DEBIAN_PACKAGES) >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y --no-install-recommends $(DEBIAN_PACKAGES); }; }

python:
	@python3 -m pipenv --version >/dev/null 2>&1 || command -v pipenv >/dev/null || python3 -m pip install -q pipenv
	$(PIPENV) sync --dev

node:
	@[ -x node_modules/.bin/cdktf ] && [ -x node_modules/.bin/azurite-blob ] || npm ci --no-audit --no-fund

# checkov pins an old `packaging` that conflicts with the app's dependencies: it gets its own venv.
checkov:
	@[ -x .tools/checkov/bin/checkov ] && .tools/checkov/bin/checkov --version | grep -qx $(CHECKOV_VERSION) || { \
	  python3 -m venv .tools/checkov && .tools/checkov/bin/pip install -q checkov==$(CHECKOV_VERSION); }

demo: debian python node
	$(PIPENV) run demo

test: setup
	$(PIPENV) run python -m pytest

clean:
	rm -rf cdktf.out .pytest_cache crashcart-out
