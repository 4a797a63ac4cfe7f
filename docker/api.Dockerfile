# syntax=docker/dockerfile:1
# The API image: python:3.11-slim with api/, kdiga_service/, migrations/ and kdiga_core/defaults.py (standard
# library only); no torch.
# Build: docker build -f docker/api.Dockerfile -t kdiga-api .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY requirements-api.txt ./
RUN pip install -r requirements-api.txt

COPY alembic.ini ./
COPY migrations/ migrations/
COPY kdiga_service/ kdiga_service/
COPY api/ api/
# the one kdiga_core module the API reads (defaults sized to the data): standard library only
COPY kdiga_core/__init__.py kdiga_core/defaults.py kdiga_core/
COPY docker/entrypoint.sh docker/healthcheck.sh docker/wait_and_migrate.py docker/

RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/kdiga --create-home kdiga \
    && chmod 0755 docker/entrypoint.sh docker/healthcheck.sh

USER kdiga
ENV KDIGA_HOME=/var/lib/kdiga \
    KDIGA_API_HOST=0.0.0.0 \
    KDIGA_API_PORT=8000 \
    KDIGA_RUN_MIGRATIONS=false \
    PYTHONPATH=/app

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=6s --start-period=30s --retries=3 CMD ["/app/docker/healthcheck.sh", "api"]
ENTRYPOINT ["/app/docker/entrypoint.sh"]
CMD ["api"]
