"""``benchmarks/step_speed.py --scope full`` as ``benchmarks/gpu_checks.sh`` runs it, at toy sizes on the CPU:
the options that script relies on exist and the throughput table comes out with every timed model."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.pipeline_helpers import REPO


@pytest.mark.slow
def test_full_scope_train_only_prints_images_per_second_and_the_coco_estimate() -> None:
    command = [
        sys.executable, "benchmarks/step_speed.py", "--scope", "full", "--train-only", "--without-ablation",
        "--batch", "2", "--image-size", "192", "--backbone", "resnet18", "--d-model", "32", "--layers", "2",
        "--queries", "10", "--classes", "5", "--repeats", "1", "--warmup", "1", "--threads", "1",
        "--estimate-gpus", "4", "--estimate-epochs", "10",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout
    assert "inference" not in output  # --train-only
    assert "no taq" not in output  # --without-ablation
    assert "10 epochs of COCO train2017 (118287 images) on 4 such devices" in output
    rows = {
        match["model"].strip(): (float(match["rate"]), float(match["ratio"]), float(match["hours"]))
        for match in re.finditer(
            r"^(?P<model>ours conditional_detr|ours sd_detr \(taq\)|hf ConditionalDetr)\s+(?P<rate>[\d.]+)\s+"
            r"(?P<ratio>[\d.]+)\s+(?P<hours>[\d.]+)$",
            output.split("training throughput per device")[1],
            flags=re.MULTILINE,
        )
    }
    assert set(rows) == {"ours conditional_detr", "ours sd_detr (taq)", "hf ConditionalDetr"}
    assert rows["hf ConditionalDetr"][1] == 1.0  # the reference against itself
    for rate, _, hours in rows.values():
        # hours = 10 epochs x 118287 images / (4 devices x rate) / 3600; rate and hours are printed to 0.1
        expected = 10 * 118_287 / (4 * rate) / 3600
        assert rate > 0 and hours == pytest.approx(expected, rel=0.06 / rate + 0.01, abs=0.06)
    step_table = output.split("training step")[1].split("training throughput per device")[0]
    x_ours = {
        match["model"].strip(): (float(match["ratio"]), float(match["x_ours"]))
        for match in re.finditer(
            r"^(?P<model>ours conditional_detr|ours sd_detr \(taq\)|hf ConditionalDetr)\s+[\d.]+\s+[\d.]+\s+"
            r"(?P<ratio>[\d.]+)\s+[\d.]+\s+(?P<x_ours>[\d.]+)\s",
            step_table,
            flags=re.MULTILINE,
        )
    }
    assert x_ours["ours conditional_detr"][1] == 1.0 and x_ours["hf ConditionalDetr"][0] == 1.0  # each against itself
    assert all(value > 0 for pair in x_ours.values() for value in pair) and len(x_ours) == 3
