#!/usr/bin/env bash
# Packs, on a machine with pip access, the Python packages that benchmarks/gpu_checks.sh needs and that the
# lent GPU machine's image lacks, for that machine's Python (CPython 3.12, x86-64 manylinux; it has no
# network). Writes .gpu_site/site.tar.xz (git-ignored; about 45 MiB, under the 64 MiB of files one call to
# that machine takes); gpu_checks.sh unpacks it there and puts it on PYTHONPATH.
#
#   benchmarks/gpu_bundle.sh                      # PYTHON=... the venv whose versions are packed (.venv)
#
# The versions are the ones installed in that venv (what CI tests). TARGET_PYTHON=3.11 packs for a Python 3.11
# machine instead, to try the bundle there (docs/benchmarks.md, "On a GPU"). The names are the dependency closure of
# ray, mlflow, pydantic and pycocotools minus what the image already holds (torch, numpy, scipy, pyarrow,
# safetensors, transformers, requests, pyyaml, protobuf, ... as listed for the image on 2026-11-17).
# Ray's Java jars and MLflow's web UI build are left out: the checks start no Java worker and no UI server.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
target_python=${TARGET_PYTHON:-3.12}  # the GPU image's CPython
packages="alembic annotated-types blinker cachetools cffi cryptography databricks-sdk docker fastapi flask
flask-cors gitdb gitpython google-auth graphene graphql-core graphql-relay gunicorn huey importlib-metadata
itsdangerous jsonschema jsonschema-specifications mako mlflow mlflow-skinny mlflow-tracing opentelemetry-api
opentelemetry-proto opentelemetry-sdk opentelemetry-semantic-conventions prettytable pyasn1 pyasn1-modules
pycocotools pycparser pydantic pydantic-core python-dotenv ray referencing rpds-py skops smmap sqlalchemy
sqlparse starlette typing-inspection uvicorn wcwidth"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# name==version of each, from the venv (fails loudly on a package the venv does not have)
"$py" - "$work/requirements.txt" $packages <<'EOF'
import importlib.metadata as metadata
import sys

out, names = sys.argv[1], sys.argv[2:]
with open(out, "w") as handle:
    handle.writelines(f"{name}=={metadata.version(name)}\n" for name in names)
EOF
platforms=()
for tag in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
"$py" -m pip install --quiet --no-deps --no-compile --only-binary=:all: --python-version "$target_python" \
    --implementation cp "${platforms[@]}" --target "$work/site" -r "$work/requirements.txt"
rm -rf "$work/site/ray/jars" "$work/site/mlflow/server/js"
mkdir -p .gpu_site
tar -C "$work/site" -cf - . | xz -T0 -6 >.gpu_site/site.tar.xz
cp "$work/requirements.txt" .gpu_site/requirements.txt
size=$(stat -c %s .gpu_site/site.tar.xz)
echo "wrote .gpu_site/site.tar.xz: $((size / 1048576)) MiB, $(wc -l <.gpu_site/requirements.txt) packages (.gpu_site/requirements.txt)"
if [ "$size" -gt $((60 * 1048576)) ]; then
    echo "too large to travel with the repository (over 60 MiB)" >&2
    exit 1
fi
