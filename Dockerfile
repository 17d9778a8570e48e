# syntax=docker/dockerfile:1
# The mlflow-agent image: `docker build -t mlflow-agent .`
# Runs as uid/gid 10001 with a read-only root filesystem in mind: it writes only to the spool directory
# (/var/lib/mlflow-agent) and /tmp.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: a wheel of the agent and its dependencies ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent ./agent
RUN python -m pip wheel --wheel-dir /wheels '.[azure]'

# ---- runtime: the wheels installed, nothing else ----
FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="mlflow-agent" \
      org.opencontainers.image.description="Local sidecar that answers MLflow tracking calls, spools them and uploads them to an MLflow server or Azure ML" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_AGENT_SPOOL_DIR=/var/lib/mlflow-agent/spool

RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-cache-dir --no-index --find-links=/wheels 'mlflow-agent[azure]' \
 && groupadd --system --gid 10001 agent \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin agent \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/mlflow-agent

USER 10001:10001
# 5050/tcp MLflow REST ingest, 5051/udp metric datagrams, 9090/tcp health and metrics (--ops-http).
EXPOSE 5050 5051/udp 9090
# SIGTERM: stop accepting, upload what is spooled for up to drain_timeout, exit.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "agent", "run"]
CMD ["--log-format", "json"]
