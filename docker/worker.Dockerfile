# syntax=docker/dockerfile:1
# The worker image: a CUDA PyTorch base + the project. One container = one worker process = one GPU
# (the device is reserved per container; concurrency 1). Build:
#   docker build -f docker/worker.Dockerfile -t kdiga-worker .
# Choose a base whose torch matches requirements.txt's pin (torch is taken from the base image).
ARG PYTORCH_IMAGE=pytorch/pytorch:2.14.1-cuda12.8-cudnn9-runtime
FROM ${PYTORCH_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY requirements.txt constraints.txt ./
# torch/torchvision (and the CUDA libraries under them) come from the base image's CUDA build;
# everything else from requirements.txt at the versions of constraints.txt (what the suite ran with).
RUN grep -vE '^(torch|torchvision)([<>=!~ ]|$)' requirements.txt > /tmp/requirements-worker.txt \
    && grep -vE '^(torch|torchvision|triton|nvidia-|cuda-)' constraints.txt > /tmp/constraints-worker.txt \
    && pip install -r /tmp/requirements-worker.txt -c /tmp/constraints-worker.txt \
    && rm /tmp/requirements-worker.txt /tmp/constraints-worker.txt

COPY pyproject.toml README.md alembic.ini ./
COPY migrations/ migrations/
COPY kdiga_core/ kdiga_core/
COPY kdiga_service/ kdiga_service/
COPY api/ api/
COPY worker/ worker/
COPY kdiga_client/ kdiga_client/
COPY kdiga_launcher/ kdiga_launcher/
COPY docker/entrypoint.sh docker/healthcheck.sh docker/wait_and_migrate.py docker/
# The project itself (the `kdiga` command too); its dependencies are already installed above.
RUN pip install --no-deps . && rm -rf build *.egg-info

RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/kdiga --create-home kdiga \
    && chmod 0755 docker/entrypoint.sh docker/healthcheck.sh

USER kdiga
ENV KDIGA_HOME=/var/lib/kdiga \
    KDIGA_WORK_DIR=/tmp/kdiga-work \
    KDIGA_WORKER_QUEUES=gpu \
    KDIGA_WORKER_CONCURRENCY=1 \
    PYTHONPATH=/app

HEALTHCHECK --interval=60s --timeout=20s --start-period=60s --retries=3 CMD ["/app/docker/healthcheck.sh", "worker"]
# SIGTERM = Celery warm shutdown (finish the running task); compose's stop_grace_period bounds it,
# and an unfinished job is redelivered and resumes from its last checkpoint.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/app/docker/entrypoint.sh"]
CMD ["worker"]
