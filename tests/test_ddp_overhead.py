"""`benchmarks/ddp_overhead.py`: the same steps as independent replicas and under DDP, timed in one run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pipeline_helpers import REPO, tiny_job_overrides


def _run(overrides: list[str], *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "benchmarks/ddp_overhead.py", *extra]
    command += [arg for override in overrides for arg in ("--set", override)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow
def test_both_modes_train_in_two_processes_and_the_ratio_is_theirs(tmp_path: Path, synthetic_root: Path) -> None:
    done = _run(tiny_job_overrides(tmp_path, synthetic_root, "ddp"), "--steps", "2")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    modes = {record["mode"]: record for record in records if "mode" in record}
    assert set(modes) == {"independent", "ddp"}
    for record in modes.values():
        assert len(record["ms_per_step"]) == 2 and min(record["ms_per_step"]) > 0  # one entry per process
        assert record["batch_per_process"] == 2 and record["images_per_s"] > 0
    ratio = [record["ddp_over_independent"] for record in records if "ddp_over_independent" in record]
    assert ratio == [round(modes["ddp"]["images_per_s"] / modes["independent"]["images_per_s"], 2)]


def test_data_that_contradict_the_config_exit_2_before_any_process_starts(tmp_path: Path, synthetic_root: Path):
    done = _run([*tiny_job_overrides(tmp_path, synthetic_root, "ddp"), "model.num_classes=3"])
    assert done.returncode == 2
    assert "model.num_classes=3 but the dataset has" in done.stderr and "Traceback" not in done.stderr
