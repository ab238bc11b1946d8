# syntax=docker/dockerfile:1
# The iot-ingest image: the daemon (`ingest`, the default) and the device simulator (`simulate`).
#   docker build -t iot-ingest .
#   docker run --rm iot-ingest --help

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the wheel is built from (see [tool.hatch.build] in pyproject.toml), and the
# versions CI tested (constraints.txt).
COPY pyproject.toml README.md constraints.txt ./
COPY ingest/ ingest/
COPY simulators/ simulators/
COPY migrations/ migrations/
# A virtualenv so the runtime stage copies one directory; no dev or test extras.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install -c constraints.txt .

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    INGEST_METRICS_PORT=9600 \
    INGEST_METRICS_HOST=0.0.0.0
# A fixed numeric uid, so orchestrators can check runAsNonRoot without resolving names.
RUN groupadd --system --gid 10001 ingest \
    && useradd --system --uid 10001 --gid ingest --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin ingest
COPY --from=build /opt/venv /opt/venv
USER 10001:10001

EXPOSE 9600
# No curl in the slim image: the standard library does it (urlopen raises on any non-2xx).
# Follows INGEST_METRICS_PORT; with the metrics server disabled (0) there is nothing to ask.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; p = os.environ.get('INGEST_METRICS_PORT', '9600'); p == '0' or urllib.request.urlopen(f'http://127.0.0.1:{p}/healthz', timeout=4)"]

# SIGTERM drains (flush, commit, acknowledge); the shutdown timeout is 30 s, so give the
# container more than that before SIGKILL (docker-compose.yml: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["ingest"]
CMD ["run"]
