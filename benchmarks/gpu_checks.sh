#!/usr/bin/env bash
# Every GPU figure the README and docs/benchmarks.md keep, in one run that fits one 10-minute call on a lent
# GPU machine (one CUDA device):
#   1. step_speed.py --scope full in bf16 at the paper's per-GPU setting (batch 2 of 800x800 images, ResNet-50,
#      d_model 256, 6+6 layers, 300 queries): training and inference ms against HF's ConditionalDetr, training
#      images/s per GPU, and what 50 COCO epochs would take on 8 such GPUs;
#   2. step_syncs.py --device cuda on the COCO recipe's model (configs/coco_r50.yaml, random backbone) at
#      800 px: the host-device waits of one training step, by call site;
#   3. check 1 again with our models torch.compile'd (training only, without the no-TAQ ablation);
#   4. the real pipelines/train.py with one GPU worker (synthetic data, local Ray, local MLflow, bf16) for 3
#      epochs at per-worker batch 2 and 16: the job's images/s and its wait for data.
# Each check runs even when an earlier one failed, under its own time limit cut to what is left of BUDGET_S
# (default 540 s), so the script returns inside one call with every output written; the exit status says
# whether any check failed or was skipped.
#
#   benchmarks/gpu_bundle.sh                       # first, where pip works: .gpu_site/site.tar.xz
#   benchmarks/gpu_checks.sh [OUTPUT_DIR]          # on the GPU machine; default outputs/gpu_checks
#   SMOKE=1 benchmarks/gpu_checks.sh /tmp/smoke    # on a CPU: every check at toy sizes (about 6 min on 2
#                                                  # cores), to test this script before a lease
# PYTHON=... picks the interpreter (default python3). Where ray, mlflow, pydantic or pycocotools cannot be
# imported and .gpu_site/site.tar.xz exists, it is unpacked to /tmp/gpu_site and put on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/gpu_checks}
py=${PYTHON:-python3}
budget=${BUDGET_S:-540}
smoke=${SMOKE:-0}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=0

if ! "$py" -c "import ray, mlflow, pydantic, pycocotools" 2>/dev/null; then
    if [ ! -f .gpu_site/site.tar.xz ]; then
        echo "ray, mlflow, pydantic or pycocotools missing and no .gpu_site/site.tar.xz: run benchmarks/gpu_bundle.sh" \
            "where pip works and carry .gpu_site" | tee "$out/setup.txt"
        failed=1
    elif mkdir -p /tmp/gpu_site && tar -xJf .gpu_site/site.tar.xz -C /tmp/gpu_site; then
        export PYTHONPATH="/tmp/gpu_site:$PYTHONPATH"
        echo "unpacked .gpu_site/site.tar.xz to /tmp/gpu_site (${SECONDS} s)"
    else
        echo "unpacking .gpu_site/site.tar.xz failed: the checks below will not import" | tee "$out/setup.txt"
        failed=1
    fi
fi

# run_check NAME CAP_S COMMAND...: COMMAND under min(CAP_S, what is left of the budget), output to NAME.txt
run_check() {
    local name=$1 cap=$2
    shift 2
    local left=$((budget - SECONDS))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 30 ]; then
        echo "$name: skipped, ${left} s of the ${budget} s budget left" | tee "$out/$name.txt"
        failed=1
        return
    fi
    echo "== $name (limit ${limit} s, ${SECONDS} s into the run)"
    timeout -k 15 "$limit" "$@" >"$out/$name.txt" 2>&1
    local status=$?
    tail -n 40 "$out/$name.txt"
    if [ "$status" -ne 0 ]; then
        echo "$name: failed with status $status (124 = hit its ${limit} s limit)" | tee -a "$out/$name.txt"
        failed=1
    fi
}

if [ "$smoke" = 1 ]; then
    device=cpu
    speed=(--device cpu --dtype fp32 --batch 2 --image-size 256 --backbone resnet18 --d-model 64 --layers 2
        --queries 30 --repeats 2 --warmup 1)
    syncs=(--device cpu --image-size 256 --steps 2)
    job=(--set scaling.use_gpu=false --set scaling.cpus_per_worker=1 --set optimizer.epochs=1)
else
    device=cuda
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1 || failed=1
    speed=(--device cuda --dtype bf16 --batch 2 --image-size 800 --backbone resnet50 --d-model 256 --layers 6
        --queries 300 --repeats 20)
    syncs=(--device cuda --image-size 800 --objects 6 --steps 10)
    job=(--set scaling.use_gpu=true --set scaling.cpus_per_worker=4 --set optimizer.epochs=3)
fi
"$py" -c "import torch, ray, mlflow; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'ray', ray.__version__, \
'mlflow', mlflow.__version__)" >>"$out/gpu.txt" 2>&1 || failed=1
cat "$out/gpu.txt"

run_check step_speed_full 150 "$py" benchmarks/step_speed.py --scope full "${speed[@]}"
run_check step_syncs 120 "$py" benchmarks/step_syncs.py --config configs/coco_r50.yaml \
    --set model.backbone.pretrained=false "${syncs[@]}"
run_check step_speed_full_compiled 240 "$py" benchmarks/step_speed.py --scope full --compile --train-only \
    --without-ablation "${speed[@]}"
for batch in 2 16; do
    run_check "train_batch$batch" 120 "$py" pipelines/train.py --set scaling.num_workers=1 "${job[@]}" \
        --set data.loader.batch_size=$batch --set training.run_name="gpu-check-$device-batch$batch-$$" \
        --set tracking.model_name=sd-detr-gpu-check
done
grep -h "\] loss .* img/s" "$out"/train_batch*.txt >"$out/train_images_per_s.txt" 2>/dev/null
cat "$out/train_images_per_s.txt"
echo "gpu_checks: ${SECONDS} s, $([ $failed = 0 ] && echo 'every check passed' || echo 'some check failed or was skipped')"
exit $failed
