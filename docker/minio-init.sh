#!/bin/sh
# One-shot MinIO setup of docker-compose.yml (service minio-init), idempotent:
#   1. the artifact bucket $MLFLOW_BUCKET;
#   2. the MinIO user $MLFLOW_S3_ACCESS_KEY / $MLFLOW_S3_SECRET_KEY that the MLflow server uses, whose only
#      policy (docker/minio-mlflow-policy.json, BUCKET replaced) allows object access to that bucket.
# The root credentials stay with this job and the MinIO server; MLflow never sees them.
set -eu
: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}" "${MLFLOW_BUCKET:?}" "${MLFLOW_S3_ACCESS_KEY:?}" "${MLFLOW_S3_SECRET_KEY:?}"
if [ "$MLFLOW_S3_ACCESS_KEY" = "$MINIO_ROOT_USER" ]; then
  echo "MLFLOW_S3_ACCESS_KEY must differ from MINIO_ROOT_USER" >&2
  exit 2
fi
mc alias set s3 http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing "s3/$MLFLOW_BUCKET"
sed "s/BUCKET/$MLFLOW_BUCKET/g" /etc/minio-init/minio-mlflow-policy.json > /tmp/mlflow-bucket-policy.json
mc admin policy create s3 mlflow-bucket /tmp/mlflow-bucket-policy.json
# `user add` sets the secret of an existing user too, so a changed .env takes effect on the next `up`.
mc admin user add s3 "$MLFLOW_S3_ACCESS_KEY" "$MLFLOW_S3_SECRET_KEY"
if ! mc admin user info s3 "$MLFLOW_S3_ACCESS_KEY" | grep -q "mlflow-bucket"; then
  mc admin policy attach s3 mlflow-bucket --user "$MLFLOW_S3_ACCESS_KEY"
fi
echo "bucket $MLFLOW_BUCKET and user $MLFLOW_S3_ACCESS_KEY (policy mlflow-bucket) ready"
