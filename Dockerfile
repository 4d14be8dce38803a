# The pipefleet worker image (also runs Flower). GPU build by default; the CPU variant:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
#                --build-arg EXTRAS=worker,monitor -t pipefleet-worker:cpu .
# The gateway image (docker-compose's gateway service) is built with EXTRAS=gateway.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124
ARG EXTRAS=worker,gpu,monitor

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/models \
    TOKENIZERS_PARALLELISM=false \
    PIPEFLEET_CONFIG=/etc/pipefleet/fleet.toml

RUN apt-get update \
 && apt-get install -y --no-install-recommends ffmpeg libsndfile1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 pipefleet \
 && mkdir -p /models /etc/pipefleet \
 && chown pipefleet /models

WORKDIR /app
# Exact versions from the lock, as CI tested them (.ci/lock refreshes it).
COPY .ci/lock.txt /app/lock.txt
# torch first, from the index matching the hardware (CUDA wheels or CPU-only wheels), at the locked version.
RUN pip install --index-url "${TORCH_INDEX_URL}" "$(grep '^torch==' /app/lock.txt)"

COPY pyproject.toml README.md ./
COPY config config
COPY producers producers
COPY tasks tasks
COPY worker worker
COPY gateway gateway
RUN pip install -c /app/lock.txt ".[${EXTRAS}]" && cp config/*.toml /etc/pipefleet/

USER pipefleet
EXPOSE 9808 5555 8000
CMD ["pipefleet", "worker"]
