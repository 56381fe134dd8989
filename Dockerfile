# One image for the API and the workers (docker-compose.yml picks the command).
# The default PyPI torch wheel bundles CUDA, so the same image runs on GPU workers.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY dpo_core ./dpo_core
COPY service ./service
COPY api ./api
COPY worker ./worker
COPY migrations ./migrations
COPY alembic.ini ./
RUN pip install .
RUN useradd --create-home --uid 1000 dpo && mkdir -p /data && chown dpo /data
USER dpo
EXPOSE 8000
CMD ["dpo-service", "api", "--host", "0.0.0.0", "--port", "8000"]
