# libertem-jupyter-proxy: developer and CI entry points.
#   make demo   a venv with LiberTEM + this package, JupyterLab with the GUI at /libertem/
#   make test   every test: the JupyterHub/nginx end-to-end suite, then all the others
#   make release-check   build sdist + wheel from HEAD and check them as users get them (RELEASE.md)
# The venv lives in .venv (override with VENV=...). Node.js (>= 18) is needed only to build
# the JupyterLab extension from labextension/; installing the wheel needs none.

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PORT ?= 8888
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)
PYTEST_ARGS ?=
# tests find libertem-server (and jupyter) the way users do: on PATH
RUN := PATH="$(abspath $(VENV))/bin:$$PATH"

.PHONY: install install-demo demo test test-fast test-slow test-e2e e2e-setup lint format bench \
	bench-quick soak docs clean hpc-setup test-hpc test-lowest test-model

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

.PHONY: demo-install release-check screenshots

# editable install with the developer tools; hatch-jupyter-builder builds the labextension
# with jlpm on the way
install: $(PY)
	$(PIP) install --quiet -e ".[test,lint,docs,release]" jupyterlab notebook
	$(VENV)/bin/jupyter server extension list 2>&1 | grep libertem_jupyter_proxy
	$(VENV)/bin/jupyter labextension list 2>&1 | grep libertem-jupyter-proxy

install-demo: install
	$(PIP) install --quiet libertem

# what the demo needs and nothing more: the package, JupyterLab, Notebook and LiberTEM
demo-install: $(PY)
	$(PIP) install --quiet -e . jupyterlab notebook libertem
	$(VENV)/bin/jupyter server extension list 2>&1 | grep libertem_jupyter_proxy

demo: demo-install
	@echo
	@echo "LiberTEM will be at  http://127.0.0.1:$(PORT)/libertem/  (log in with the token link below)"
	@echo
	$(VENV)/bin/jupyter lab --no-browser --ServerApp.ip=127.0.0.1 --ServerApp.port=$(PORT) $(ROOT_FLAG)

# every test: the JupyterHub/nginx end-to-end suite (its own environments, see e2e-setup),
# then everything else (unit, integration, browser, real LiberTEM, docs, soak); both always run
test: install-demo e2e-setup
	LTJP_E2E_REQUIRED=1 $(RUN) $(PY) -m pytest -m e2e tests/e2e $(PYTEST_ARGS); e2e=$$?; \
	$(RUN) $(PY) -m pytest -m "not e2e" $(PYTEST_ARGS); main=$$?; \
	$(MAKE) test-lowest; lowest=$$?; \
	exit $$(( e2e || main || lowest ))

test-fast: install
	$(RUN) $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: install-demo
	$(RUN) $(PY) -m pytest -m "slow and not e2e" $(PYTEST_ARGS)

# sdist + wheel from a clean export of HEAD, checked as users get them; the files to publish
# land in dist/ (tools/release_check.py says what is checked, RELEASE.md how to release)
release-check: install
	$(PY) tools/release_check.py

# the docs' pictures of the launcher, the loading page and an error page (real libertem-server)
screenshots: install-demo
	LJP_SCREENSHOT_DIR=docs/_static/screenshots $(RUN) $(PY) -m pytest -m browser tests/browser $(PYTEST_ARGS)

# the lifecycle tests (and the stateful model) and the tests of the relay paths that lean on
# tornado's HTTP/1.1 internals (body take-over, chunked framing, splice, websocket take-over) once
# more in a second venv with the LOWEST versions pyproject.toml allows (tornado, jupyter_server,
# simpervisor, aiohttp: .ci/lowest_pins.py); the package itself comes from this checkout via
# PYTHONPATH (no labextension build needed)
LOWEST_VENV ?= .venv-lowest
LOWEST_TESTS := tests/test_lifecycle.py tests/test_lifecycle_intent.py tests/test_lifecycle_model.py \
	tests/test_splice.py tests/test_upload_takeover.py tests/test_body_integrity.py \
	tests/test_http_regressions.py tests/test_ws_relay.py tests/test_upstream_client.py \
	tests/test_upload_client.py tests/test_upload_regressions.py tests/test_ws_bridges.py \
	tests/test_proxy_ws.py tests/test_ws_transport.py tests/test_ws_close_rules.py
test-lowest:
	test -x $(LOWEST_VENV)/bin/python || python3 -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pip install --quiet $$(python3 .ci/lowest_pins.py) \
		"pytest>=8,<10" "pytest-tornasync>=0.6" "psutil>=5.9" "hypothesis>=6.100" \
		"pytest-timeout>=2.2"
	$(LOWEST_VENV)/bin/python -m pip list 2>/dev/null | grep -iE '^(tornado|jupyter.server|simpervisor|aiohttp) '
	PATH="$(abspath $(LOWEST_VENV))/bin:$$PATH" PYTHONPATH="$(CURDIR)" \
		$(LOWEST_VENV)/bin/python -m pytest $(LOWEST_TESTS) $(PYTEST_ARGS)

# a longer search of the stateful lifecycle model (CI runs a bounded one as part of make test)
MODEL_EXAMPLES ?= 60
MODEL_STEPS ?= 30
test-model: install
	LTJP_MODEL_EXAMPLES=$(MODEL_EXAMPLES) LTJP_MODEL_STEPS=$(MODEL_STEPS) $(RUN) $(PY) -m pytest \
		-s -p no:logging tests/test_lifecycle_model.py $(PYTEST_ARGS)

# real-world end to end: nginx -> JupyterHub -> user servers -> LiberTEM in its own venv
e2e-setup: install
	bash tests/e2e/setup.sh

test-e2e: e2e-setup
	LTJP_E2E_REQUIRED=1 $(PY) -m pytest -m e2e tests/e2e $(PYTEST_ARGS)

# HPC end to end (tests/hpc/): munge + Slurm + Lmod + JupyterHub 6.1.1 + batchspawner 1.3.0 +
# Chromium, as root, in a network namespace of its own (every address is loopback); a test user
# is created and removed. Environments below /opt/ltjp-hpc (HPC_DIR), built once.
hpc-setup: install
	bash tests/hpc/setup.sh

# (127.0.0.2 on lo: glibc's getaddrinfo(AI_ADDRCONFIG), used by Slurm, finds no IPv4 when the
# only address is 127.0.0.1, and Slurm then cannot resolve even "127.0.0.1")
test-hpc: hpc-setup
	unshare --net -- sh -c 'ip link set lo up && ip addr add 127.0.0.2/8 dev lo && \
		LTJP_HPC_REQUIRED=1 $(RUN) $(PY) -m pytest -m hpc tests/hpc $(PYTEST_ARGS)'

lint: install
	$(VENV)/bin/ruff check libertem_jupyter_proxy tests bench docs
	$(VENV)/bin/ruff format --check libertem_jupyter_proxy tests bench docs

format: install
	$(VENV)/bin/ruff format libertem_jupyter_proxy tests bench docs
	$(VENV)/bin/ruff check --fix libertem_jupyter_proxy tests bench docs

# Sphinx site in docs/_build/html; warnings are errors (tests/test_docs.py also builds it)
docs: install
	$(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

# proxy vs direct vs jupyter-server-proxy 4.6.0 (bench/README.md); e.g. BENCH_ARGS="--only download"
bench: install
	$(RUN) $(PY) bench/run.py $(BENCH_ARGS)

bench-quick: install
	$(RUN) $(PY) bench/run.py --quick $(BENCH_ARGS)

# mixed traffic with shutdowns and crashes for 10 minutes (bench/soak.py)
soak: install
	$(RUN) $(PY) bench/soak.py --minutes 10

clean:
	rm -rf $(VENV) build dist docs/_build .e2e e2e-artifacts hpc-artifacts libertem_jupyter_proxy/labextension \
		labextension/node_modules labextension/.yarn
