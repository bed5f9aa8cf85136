# syntax=docker/dockerfile:1.7
# The Ray image of the chart's RayCluster (head and GPU workers): Ray's own CUDA image of the same Ray
# version as Stillhouse (2.60.0), with Stillhouse and a CUDA build of torch added. Build from the
# repository root:
#   docker build -f deploy/docker/ray.Dockerfile -t stillhouse-ray:0.1.0 .   (or `make images REGISTRY=...`)
# For CPU-only clusters (kind): --build-arg RAY_IMAGE=docker.io/rayproject/ray:2.60.0-py311
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG RAY_IMAGE=docker.io/rayproject/ray:2.60.0-py311-gpu
ARG PYTHON_IMAGE=docker.io/library/python:3.11.14-slim-bookworm

# --- wheel: Stillhouse as a wheel, built away from the final image ------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- the Ray image ---------------------------------------------------------------------------------------
FROM ${RAY_IMAGE}
# PyPI's torch wheel for Linux is the CUDA build; the CPU variant passes PyTorch's CPU index instead.
ARG TORCH_INDEX_URL=https://pypi.org/simple
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=wheel --chown=1000:100 /wheels /tmp/wheels
# Ray 2.60.0 is already in the image and satisfies Stillhouse's pin, so pip leaves it alone.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
 && pip install /tmp/wheels/stillhouse-*.whl \
 && python -c "import ray, torch, stillhouse; assert ray.__version__ == '2.60.0', ray.__version__" \
 && rm -rf /tmp/wheels
# The image's own user (ray, uid 1000); KubeRay adds its liveness and readiness probes to Ray containers.
USER 1000:100
