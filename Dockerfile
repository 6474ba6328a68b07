# kubetune images: two targets, each the project's own install script with one extra.
#
#   docker build --target operator -t kubetune-operator:0.1.0 .
#   docker build --target trainer  -t kubetune-trainer:0.1.0 .
#
# Both run scripts/setup.sh, the same script the tests install with, so CI
# exercises these install steps on every run (tests/unit/test_packaging.py).
# The trainer image's torch wheel carries its CUDA libraries; GPU nodes need
# only the NVIDIA driver and container toolkit.
#
# Behind a TLS-inspecting proxy, hand the install steps its CA bundle as a
# build secret; it is mounted for those steps only and never stored in a layer:
#   docker build --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt ...
# scripts/build-images.sh builds both targets with buildah and no registry.

ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/kubetune/bin:$PATH
# KubeRay starts every Ray container as `bash -lc ...`, and a login shell takes
# PATH from /etc/profile, which drops the ENV PATH above; profile.d puts the
# venv back in front for every user.
RUN --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && python -m pip install --no-cache-dir uv==0.13.9 \
 && groupadd --gid 10001 kubetune \
 && useradd --uid 10001 --gid kubetune --home-dir /home/kubetune --create-home \
    --shell /bin/bash kubetune \
 && echo 'export PATH=/opt/kubetune/bin:$PATH' > /etc/profile.d/kubetune.sh
WORKDIR /src
# Dependency metadata first: source edits do not invalidate the dependency layer.
COPY pyproject.toml constraints.txt README.md ./
COPY scripts/setup.sh scripts/setup.sh

FROM base AS operator
COPY operator/ operator/
COPY trainer/ trainer/
# uv's downloads live in a cache mount (kept between builds, never in a layer);
# copy mode because the mount is another filesystem than the venv. PYTHON is
# resolved before the venv exists: once it does, `python` on PATH is the venv's.
RUN --mount=type=cache,id=kubetune-uv,target=/var/cache/kubetune-uv \
    --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export SSL_CERT_FILE=/run/secrets/ca-bundle; fi \
 && export UV_CACHE_DIR=/var/cache/kubetune-uv UV_LINK_MODE=copy \
 && KUBETUNE_VENV=/opt/kubetune KUBETUNE_EXTRAS=operator KUBETUNE_DEV=0 PYTHON="$(command -v python)" \
    bash scripts/setup.sh
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["kubetune", "operator"]

FROM base AS trainer
# g++: DeepSpeed compiles some of its ops at first use (ninja comes with the
# trainer extra). wget: KubeRay's Ray probes call it. The kuberay extra adds
# Ray's dashboard, which those probes and RayJob submission need.
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ wget \
 && rm -rf /var/lib/apt/lists/*
COPY operator/ operator/
COPY trainer/ trainer/
RUN --mount=type=cache,id=kubetune-uv,target=/var/cache/kubetune-uv \
    --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export SSL_CERT_FILE=/run/secrets/ca-bundle; fi \
 && export UV_CACHE_DIR=/var/cache/kubetune-uv UV_LINK_MODE=copy \
 && KUBETUNE_VENV=/opt/kubetune KUBETUNE_EXTRAS=trainer,kuberay KUBETUNE_DEV=0 PYTHON="$(command -v python)" \
    bash scripts/setup.sh
# Ray's session files (/tmp/ray), DeepSpeed's compiled ops and Hugging Face's
# cache all belong to the non-root user, as does its home.
ENV TORCH_EXTENSIONS_DIR=/tmp/torch_extensions \
    HF_HOME=/tmp/hf
RUN install -d -m 0755 -o 10001 -g 10001 /tmp/ray /tmp/torch_extensions /tmp/hf
USER 10001:10001
WORKDIR /home/kubetune
ENTRYPOINT ["python", "-m", "kubetune_trainer"]
