# One image for every role; the command picks it: streamfleet worker | gateway | simulator.
# Build: docker build -t streamfleet .   (docker-compose.yml and k8s/ run it)
# tests/test_deploy.py runs this file's RUN steps into a fresh venv and starts each role from it.

FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
COPY requirements.lock /tmp/requirements.lock
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps -r /tmp/requirements.lock
COPY pyproject.toml README.md /src/
COPY shared /src/shared
COPY worker /src/worker
COPY producer /src/producer
COPY simulator /src/simulator
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps /src

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin streamfleet
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    STREAMFLEET_LOG_FORMAT=json \
    STREAMFLEET_STATE_DIR=/tmp/streamfleet
USER 10001
# 8000 gateway, 9000 simulator, 9100 worker metrics and probes
EXPOSE 8000 9000 9100
ENTRYPOINT ["streamfleet"]
CMD ["worker", "--metrics-port", "9100"]
