# Two images from one file (docker-compose.yml builds both):
#   docker build --target api    -t dpo-service-api .     the API, the dpo client, migrations; no torch
#   docker build --target worker -t dpo-service-worker .  a worker: the same plus torch, peft, accelerate
# The worker's torch comes from PyTorch's CPU index unless TORCH_INDEX_URL names another, e.g. for GPUs:
#   docker build --target worker --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# WORKER_EXTRAS=worker,tracking adds the report_to trackers (TensorBoard, MLflow, W&B).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# Both images run as dpo, named by its uid (USER 1000:1000) so that a runtime can check that it is not
# root (Kubernetes' runAsNonRoot).
RUN useradd --create-home --uid 1000 --user-group dpo

# Build stages: the project and its dependencies go into /opt/venv, which the runtime stages copy
# (same base image, same path); the sources and pip's build files stay behind.
FROM base AS sources
WORKDIR /src
COPY pyproject.toml README.md ./
COPY dpo_core ./dpo_core
COPY service ./service
COPY api ./api
COPY worker ./worker
COPY migrations ./migrations
COPY dpo_client ./dpo_client

FROM base AS build
RUN python -m venv /opt/venv
WORKDIR /src

FROM build AS build-api
COPY --from=sources /src /src
# hadolint ignore=DL3013
RUN pip install . && ! pip show torch

FROM build AS build-worker
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG WORKER_EXTRAS=worker
# torch first, from its own index, so that the range in pyproject.toml is already met by that build
# and pip does not pull the default (CUDA) one; the largest layer, cached apart from the sources.
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
COPY --from=sources /src /src
# hadolint ignore=DL3013
RUN pip install ".[$WORKER_EXTRAS]"

FROM base AS api
COPY --from=build-api /opt/venv /opt/venv
RUN mkdir -p /data && chown dpo /data
ENV DPO_DATA_DIR=/data
USER 1000:1000
WORKDIR /home/dpo
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --retries=5 \
    CMD ["python", "-c", "import httpx; httpx.get('http://127.0.0.1:8000/readyz').raise_for_status()"]
CMD ["dpo-service", "api", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS worker
COPY --from=build-worker /opt/venv /opt/venv
# The worker's only disk: its scratch directory (DPO_DATA_DIR/scratch), a job's data and checkpoints on
# their way from and to the store, emptied after each run.
RUN mkdir -p /data && chown dpo /data
ENV DPO_DATA_DIR=/data
USER 1000:1000
WORKDIR /home/dpo
# SIGTERM: the running job checkpoints at its next step and goes back to the queue.
CMD ["dpo-service", "worker"]
