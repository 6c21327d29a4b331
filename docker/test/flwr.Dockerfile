# TEST ONLY. Stand-ins for Flower's images flwr/superlink, flwr/supernode and flwr/superexec, built where
# Docker Hub cannot be reached (`make docker-test`), from a Debian bookworm base made locally with
# debootstrap. Same layout as Flower's own images (framework/docker/base): Python venv in /python/venv
# owned by the non-root user `app` (uid 49999), WORKDIR and HOME /app, `flwr` from PyPI, CPython's headers
# (Flower builds its Python from source, headers included), and the binary as entrypoint.
# Targets: superlink, supernode, superexec.
#
# Build context: a folder holding ca.pem, the CA bundle pip needs for https on this machine. It is used
# in the first stage only and is in none of the images.
ARG DEBIAN_IMAGE=fedsb-test/debian:bookworm

FROM ${DEBIAN_IMAGE} AS python
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY ca.pem /tmp/ca.pem
ARG FLWR_VERSION=1.41.0
RUN python3 -m venv /python/venv \
    && PIP_CERT=/tmp/ca.pem /python/venv/bin/python -m pip install --no-cache-dir "flwr==${FLWR_VERSION}"

FROM ${DEBIAN_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev libsqlite3-0 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --no-create-home --home-dir /app -c "" --uid 49999 app \
    && mkdir -p /app \
    && chown -R app:app /app
COPY --from=python --chown=app:app /python/venv /python/venv
ENV PATH=/python/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONIOENCODING=UTF-8 \
    LANG=C.UTF-8 \
    LC_ALL=C.UTF-8
WORKDIR /app
USER app
ENV HOME=/app

FROM base AS superlink
ENTRYPOINT ["flower-superlink"]

FROM base AS supernode
ENTRYPOINT ["flower-supernode"]

FROM base AS superexec
ENTRYPOINT ["flower-superexec"]
