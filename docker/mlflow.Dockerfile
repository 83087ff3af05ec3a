# syntax=docker/dockerfile:1
# MLflow tracking server for docker-compose.yml: the official image is core-only (no PostgreSQL driver, no
# S3 client, no basic-auth dependency), so add psycopg2 (backend store), boto3 (MinIO/S3 artifact store
# through --serve-artifacts) and Flask-WTF (imported by `mlflow server --app-name basic-auth`).
# The server version matches the client the project pins (mlflow>=3.17,<3.18).
FROM ghcr.io/mlflow/mlflow:v3.17.2

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install psycopg2-binary==2.9.13 boto3==1.44.8 Flask-WTF==1.3.0 \
    && python -c "import mlflow, psycopg2, boto3, flask_wtf; assert mlflow.__version__ == '3.17.2', mlflow.__version__"

# Basic auth: the app's settings (no secret in them) and the user store's folder, a volume in compose.
# docker/mlflow_users.py creates the pipeline's user (service mlflow-users).
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin mlflow \
    && mkdir -p /var/lib/mlflow-auth /etc/mlflow \
    && chown 10001:10001 /var/lib/mlflow-auth
COPY basic_auth.ini /etc/mlflow/basic_auth.ini
COPY mlflow_users.py /usr/local/lib/mlflow_users.py
ENV MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/basic_auth.ini \
    HOME=/tmp

# Not root: the server and the user setup run as `mlflow` (uid 10001).
USER 10001:10001
