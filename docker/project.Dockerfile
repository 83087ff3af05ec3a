# syntax=docker/dockerfile:1
# The image of every Ray node (head and workers): Ray 2.60 + the sd-detr package, installed the way the
# README installs it (torch/torchvision first, then the project), so head, workers and the job driver run
# the same code and the same dependency versions. A job submitted with `--working-dir .` ships your
# checkout on top; rebuild the image when pyproject.toml's dependencies change.
#
# GPU: the default torch 2.14.1 wheel pip serves on x86_64 is the CUDA 13.0 build (torch.version.cuda ==
# "13.0"); it brings its CUDA runtime, cuDNN and NCCL as nvidia-*-cu13 wheels, so the base image's own CUDA
# toolkit is not used by torch. The host needs an NVIDIA driver that supports CUDA 13.0 (R580 or newer) and
# the NVIDIA Container Toolkit. The `-gpu` Ray image is used for Ray's GPU support and NVIDIA env settings.
# CPU-only hosts: RAY_BASE_IMAGE=rayproject/ray:2.60.0-py311 and, for a smaller image,
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu (torch 2.14.1+cpu, the same version).
ARG RAY_BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_BASE_IMAGE}

ARG TORCH_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, in its own layer: it is the large, rarely changing part.
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.14.1 torchvision==0.29.1 \
    && python -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# The shared mount of docker-compose.yml: datasets (/shared/data) and Ray storage (/shared/ray_results),
# the same path on every node. Created here, owned by `ray`, so that a fresh named volume (which Docker
# fills from the image) is writable by the nodes. A bind-mounted host path must be writable by uid 1000.
USER root
RUN mkdir -p /shared/data /shared/ray_results && chown -R 1000:100 /shared
USER 1000

# The Ray images run as user `ray` (uid 1000, gid 100); the source tree must be writable for the build.
WORKDIR /home/ray/sd-detr
COPY --chown=1000:100 . .
RUN pip install . \
    && python -c "import ray, mlflow, sd_detr, pipelines; assert ray.__version__ == '2.60.0', ray.__version__"
