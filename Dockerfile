# kubetune images: two targets, each the project's own install script with one extra.
#
#   docker build --target operator -t kubetune-operator:0.1.0 .
#   docker build --target trainer  -t kubetune-trainer:0.1.0 .
#
# Both run scripts/setup.sh, the same script the tests install with, so CI
# exercises these install steps on every run (tests/unit/test_packaging.py).
# The trainer image's torch wheel carries its CUDA libraries; GPU nodes need
# only the NVIDIA driver and container toolkit.

ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/kubetune/bin:$PATH
RUN python -m pip install --no-cache-dir uv==0.13.9 \
 && groupadd --gid 10001 kubetune \
 && useradd --uid 10001 --gid kubetune --home-dir /home/kubetune --create-home kubetune
WORKDIR /src
# Dependency metadata first: source edits do not invalidate the dependency layer.
COPY pyproject.toml constraints.txt README.md ./
COPY scripts/setup.sh scripts/setup.sh

FROM base AS operator
COPY operator/ operator/
COPY trainer/ trainer/
RUN KUBETUNE_VENV=/opt/kubetune KUBETUNE_EXTRAS=operator KUBETUNE_DEV=0 PYTHON=python \
    bash scripts/setup.sh \
 && rm -rf /root/.cache
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["kubetune", "operator"]

FROM base AS trainer
# g++: DeepSpeed builds some of its ops at first use. wget: KubeRay's Ray probes call it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ wget \
 && rm -rf /var/lib/apt/lists/*
COPY operator/ operator/
COPY trainer/ trainer/
RUN KUBETUNE_VENV=/opt/kubetune KUBETUNE_EXTRAS=trainer KUBETUNE_DEV=0 PYTHON=python \
    bash scripts/setup.sh \
 && rm -rf /root/.cache
ENV TORCH_EXTENSIONS_DIR=/tmp/torch_extensions \
    HF_HOME=/tmp/hf
USER 10001:10001
WORKDIR /home/kubetune
ENTRYPOINT ["python", "-m", "kubetune_trainer"]
