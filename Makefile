# Parley: `make` (or `make help`) lists every target.

# The interpreter that creates the virtualenv (Python 3.11 or 3.12).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Extra pytest options, e.g. make test PYTEST_ARGS="-x -k migrate"
PYTEST_ARGS ?=
# Extra `uv pip compile` options, e.g. make lock LOCK_ARGS=--upgrade
LOCK_ARGS ?=
LOCK_PYTHON_VERSION ?= 3.11

# Written by `make venv` once the lock file is installed; re-installs when the lock or
# pyproject.toml is newer.
VENV_STAMP := $(VENV)/.parley-installed

.DEFAULT_GOAL := help
SHELL := /usr/bin/env bash
.SHELLFLAGS := -euo pipefail -c

##@ General

# Targets are listed from their `## description` comments, grouped by `##@ section`
# lines (as in kubebuilder's Makefile).
.PHONY: help
help: ## Display this help.
	@awk 'BEGIN {FS = ":.*##"; printf "\nUsage:\n  make \033[36m<target>\033[0m\n"} /^[a-zA-Z_0-9-]+:.*?##/ { printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2 } /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) } ' $(MAKEFILE_LIST)

##@ Development

.PHONY: venv
venv: $(VENV_STAMP) ## Create .venv from requirements/dev.lock (hash-checked) with parley installed editable.

$(VENV_STAMP): requirements/dev.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements/dev.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

.PHONY: run
run: venv ## Run the whole stack locally (parley dev): web, realtime, worker, demo user.
	$(BIN)/parley dev

.PHONY: migrate
migrate: venv ## Apply database migrations to DATABASE_URL.
	$(BIN)/parley migrate

##@ Quality

.PHONY: test
test: venv ## Run the tests against real Postgres and Redis (embedded ones if none answer); PYTEST_ARGS=... passes options.
	$(BIN)/pytest services/tests $(PYTEST_ARGS)

.PHONY: lint
lint: venv ## Check code and formatting with ruff.
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

.PHONY: fmt
fmt: venv ## Format the code and apply ruff's safe fixes.
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

.PHONY: browser-deps
browser-deps: ## Install Debian's Chromium for the browser tests (root; they are skipped without it).
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium)

.PHONY: screenshots
screenshots: venv ## Re-take docs/screenshots/*.png in Chromium.
	PARLEY_UPDATE_SCREENSHOTS=1 $(BIN)/pytest services/tests/browser -k screenshots

##@ Deployment

# Extra options for the container tests, e.g. CONTAINER_TEST_ARGS=--install (CI).
CONTAINER_TEST_ARGS ?=

.PHONY: image
image: ## Build the container image localhost/parley:latest (Podman or Docker; docs/containers.md).
	deploy/docker/build-image.sh

.PHONY: image-loadtest
image-loadtest: ## Build the load-test image localhost/parley-loadtest:latest (Locust + loadtests/; the chart's loadtest Jobs).
	PARLEY_TARGET=loadtest deploy/docker/build-image.sh

.PHONY: up
up: image ## Start the whole topology (docker-compose.yml) in the background; creates .env on first use.
	deploy/docker/init-env.sh
	deploy/docker/compose.sh up -d

.PHONY: down
down: ## Stop and remove the topology's containers (data stays in its volumes).
	deploy/docker/compose.sh down

.PHONY: logs
logs: ## Follow the topology's logs.
	deploy/docker/compose.sh logs -f --tail=100

.PHONY: test-containers
test-containers: venv ## Build the image and test it with Podman; CONTAINER_TEST_ARGS=--install installs Podman.
	$(BIN)/python services/tests/containers/run_container_tests.py $(CONTAINER_TEST_ARGS)

.PHONY: chart
chart: venv ## Regenerate the chart's README table and values.schema.json, and the k8s/ manifests.
	$(BIN)/python deploy/helm/chart-docs.py
	$(BIN)/python deploy/helm/render-k8s.py

##@ Load tests

URL ?= http://127.0.0.1:8000
WS_URL ?=
SCENARIO ?= chat
USERS ?= 100
SPAWN_RATE ?= 10
DURATION ?= 5m
LOCUST_ARGS ?=
BENCH_ARGS ?=

.PHONY: loadtest
loadtest: venv ## Locust headless against URL (WS_URL=, SCENARIO=chat|storm|large-room|history, USERS, DURATION).
	$(BIN)/locust -f loadtests/locustfile.py --headless --host $(URL) $(if $(WS_URL),--ws-url $(WS_URL)) --scenario $(SCENARIO) -u $(USERS) -r $(SPAWN_RATE) -t $(DURATION) --csv loadtests/results/$(shell date -u +%Y-%m-%dT%H%M%SZ)-locust-$(SCENARIO) $(LOCUST_ARGS)

.PHONY: bench
bench: venv ## Benchmark the local topology against naive and no-op configurations (BENCH_ARGS="--profile full").
	$(BIN)/python -m loadtests.bench $(BENCH_ARGS)

##@ Dependencies

.PHONY: lock
lock: venv ## Re-compile requirements/runtime.lock, dev.lock and load.lock from pyproject.toml with uv (hashes kept).
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv
	$(BIN)/uv pip compile --quiet pyproject.toml --python-version $(LOCK_PYTHON_VERSION) --generate-hashes $(LOCK_ARGS) -o requirements/runtime.lock
	$(BIN)/uv pip compile --quiet pyproject.toml --extra embedded --extra test --extra load --python-version $(LOCK_PYTHON_VERSION) --generate-hashes $(LOCK_ARGS) -o requirements/dev.lock
	$(BIN)/uv pip compile --quiet --group pyproject.toml:loadtest --python-version $(LOCK_PYTHON_VERSION) --generate-hashes $(LOCK_ARGS) -o requirements/load.lock

##@ Cleanup

.PHONY: clean
clean: ## Remove the virtualenv, caches and build output (keeps .parley/, the dev data).
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist staticfiles services/*.egg-info
	find services -name __pycache__ -type d -prune -exec rm -rf {} +
