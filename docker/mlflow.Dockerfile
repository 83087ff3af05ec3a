# syntax=docker/dockerfile:1
# MLflow tracking server for docker-compose.yml: the official image is core-only (no PostgreSQL driver, no
# S3 client), so add psycopg2 (backend store) and boto3 (MinIO/S3 artifact store through --serve-artifacts).
# The server version matches the client the project pins (mlflow>=3.17,<3.18).
FROM ghcr.io/mlflow/mlflow:v3.17.2

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install psycopg2-binary==2.9.13 boto3==1.44.8 \
    && python -c "import mlflow, psycopg2, boto3; assert mlflow.__version__ == '3.17.2', mlflow.__version__"
