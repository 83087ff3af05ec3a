#!/usr/bin/env bash
# The GPU figures of the README in one run (one CUDA device):
#   1. benchmarks/step_speed.py in bf16 autocast with a paper-sized transformer (d_model 256, 6+6 layers,
#      300 queries, ResNet-50 features of 800x800 images, batch 8): ms per step, ratio to HF, TFLOP/s;
#   2. images/s of the real `pipelines/train.py` with one GPU worker (default config otherwise: the
#      synthetic data, local Ray, local MLflow), at the default per-worker batch 2 and at batch 16.
#
#   benchmarks/gpu_checks.sh [OUTPUT_DIR]        # default outputs/gpu_checks; PYTHON=... to pick python
set -euo pipefail
out=${1:-outputs/gpu_checks}
py=${PYTHON:-python}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=0  # each check runs even when an earlier one failed; the exit status says whether any did

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"

"$py" benchmarks/step_speed.py --device cuda --dtype bf16 --batch 8 --image-size 800 --d-model 256 \
    --layers 6 --queries 300 --backbone resnet50 --repeats 20 2>&1 | tee "$out/step_speed_bf16.txt" ||
    { echo "step_speed.py failed"; failed=1; }

for batch in 2 16; do
    "$py" pipelines/train.py \
        --set scaling.num_workers=1 --set scaling.use_gpu=true --set scaling.cpus_per_worker=4 \
        --set data.loader.batch_size=$batch --set optimizer.epochs=3 \
        --set training.run_name=gpu-batch$batch --set tracking.model_name=sd-detr-gpu-check \
        2>&1 | tee "$out/train_batch$batch.txt" ||
        { echo "train.py (batch $batch) failed"; failed=1; }
done
grep -h "\] loss .* img/s" "$out"/train_batch*.txt | tee "$out/train_images_per_s.txt" || true
exit $failed
