"""`benchmarks/recipe_probe.py`: the single-process stand-in of the main job trains and evaluates for real."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from pipelines.run_setup import resolve_data
from sd_detr.model import build_detector
from tests.pipeline_helpers import load_benchmark, tiny_job_config, tiny_job_overrides


@pytest.mark.slow
def test_probe_trains_and_reports_pycocotools_ap_at_each_evaluation(
    tmp_path: Path, synthetic_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    probe = load_benchmark("recipe_probe")
    cfg = tiny_job_config(tmp_path, synthetic_root, "probe", epochs=3)
    with caplog.at_level(logging.INFO, logger="benchmarks.recipe_probe"):
        result = probe.probe(cfg, eval_every=2)
    records = result.records
    assert [r["epoch"] for r in records] == [2, 3]  # every 2 epochs and after the last
    for record in records:
        assert 0.0 <= record["AP"] <= record["AP50"] <= 1.0
        assert record["train_images_per_s"] > 0 and math.isfinite(record["train_loss"]) and record["train_loss"] > 0
    # it trained: every trainable tensor moved away from the seed's initial weights, except TAQ's fill slots
    # (used only where an image has fewer feature cells than queries, never at these sizes)
    resolved = resolve_data(cfg.with_absolute_paths())
    initial = build_detector(resolved.model, seed=resolved.training.seed).state_dict()
    unmoved = [n for n, p in result.model.named_parameters() if p.requires_grad and torch.equal(p, initial[n])]
    assert all(".query_generator.fill_" in name for name in unmoved), unmoved
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "benchmarks.recipe_probe"]
    assert logged == records


def test_probe_refuses_a_model_whose_classes_contradict_the_data(tmp_path: Path, synthetic_root: Path) -> None:
    probe = load_benchmark("recipe_probe")
    cfg = tiny_job_config(tmp_path, synthetic_root, "probe", extra=["model.num_classes=3"])
    with pytest.raises(ValueError, match="num_classes=3"):
        probe.probe(cfg, eval_every=1)


def test_probe_command_exits_2_with_the_reason_before_training(
    tmp_path: Path, synthetic_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    probe = load_benchmark("recipe_probe")
    overrides = [*tiny_job_overrides(tmp_path, synthetic_root, "probe"), "model.num_classes=3"]
    with pytest.raises(SystemExit) as exit_info:
        probe.main([arg for override in overrides for arg in ("--set", override)])
    assert exit_info.value.code == 2
    assert "model.num_classes=3 but the dataset has" in capsys.readouterr().err
