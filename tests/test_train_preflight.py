"""`pipelines/train.py` refuses a job it cannot run before it touches Ray: exit code 2 and a message naming the
field or path (the paper config without backbone weights, a missing or unfit weights file, an old shard
directory without its ground truth); the explicit random-backbone opt-out passes with a warning."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from tests.pipeline_helpers import tiny_job_overrides
from tests.test_backbone_weights import torchvision_state

REPO = Path(__file__).resolve().parents[1]
COCO_CONFIG = REPO / "configs" / "coco_r50.yaml"
BASELINE = REPO / "configs" / "variants" / "conditional_detr.yaml"


def _forbidden(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("train.py went past its checks")


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if train.py gets as far as starting (or joining) Ray."""
    import pipelines.training

    monkeypatch.setattr(pipelines.training, "ensure_ray", _forbidden)


@pytest.fixture
def no_tracking(monkeypatch: pytest.MonkeyPatch, no_ray: None) -> None:
    """Fail the test if train.py gets as far as the tracking store and the data."""
    import pipelines.training

    monkeypatch.setattr(pipelines.training, "prepare_run", _forbidden)


def _train_main_exit(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run `pipelines/train.py` main and expect exit code 2; return its stderr. Callers use the `no_ray`
    fixture, which fails the test if the job gets as far as starting or joining Ray (whether another test of
    the session already started Ray in this process does not matter)."""
    from pipelines.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_paper_config_without_weights_exits_2_naming_the_field(no_tracking, capsys) -> None:
    err = _train_main_exit(["--config", str(COCO_CONFIG)], capsys)
    assert "model.backbone.weights_path" in err and "model.backbone.pretrained=false" in err
    err = _train_main_exit(["--config", str(COCO_CONFIG), "--config", str(BASELINE)], capsys)  # README baseline
    assert "model.backbone.weights_path" in err


def test_missing_or_unfit_weights_file_exits_2(no_tracking, capsys, tmp_path: Path) -> None:
    missing = tmp_path / "resnet50.pth"
    err = _train_main_exit(["--config", str(COCO_CONFIG), "--set", f"model.backbone.weights_path={missing}"], capsys)
    assert str(missing) in err
    wrong = tmp_path / "resnet18.pth"
    torch.save(torchvision_state("resnet18"), wrong)
    err = _train_main_exit(["--config", str(COCO_CONFIG), "--set", f"model.backbone.weights_path={wrong}"], capsys)
    assert str(wrong) in err and "missing keys" in err and "layer1.0.conv3.weight" in err


def test_opt_out_passes_the_check_and_warns(no_ray, monkeypatch, caplog, capsys) -> None:
    """With pretrained=false the job goes on (here: to the first stage after the checks) and warns."""
    import pipelines.training

    reached = []

    def stop(*_args: object, **_kwargs: object) -> None:
        reached.append(True)
        raise ValueError("stopped after the checks")

    monkeypatch.setattr(pipelines.training, "prepare_run", stop)
    with caplog.at_level(logging.WARNING, logger="pipelines.training"):
        err = _train_main_exit(["--config", str(COCO_CONFIG), "--set", "model.backbone.pretrained=false"], capsys)
    assert reached and "stopped after the checks" in err
    assert any("RANDOM weights with frozen BatchNorm" in r.getMessage() for r in caplog.records)


def test_old_shard_directory_without_ground_truth_exits_2(no_ray, capsys, tmp_path: Path, synthetic_root) -> None:
    """A val directory converted before the ground truth traveled with the shards fails at start, with the
    re-convert command, not at the first evaluation."""
    val = tmp_path / "old_val"
    shutil.copytree(synthetic_root / "val", val)
    (val / "_ground_truth.json").unlink()
    meta = json.loads((val / "_meta.json").read_text())
    meta["schema_version"] = 1
    (val / "_meta.json").write_text(json.dumps(meta))
    overrides = [*tiny_job_overrides(tmp_path, synthetic_root, "old-shards"), f"data.val_dir={val}"]
    err = _train_main_exit([arg for override in overrides for arg in ("--set", override)], capsys)
    assert str(val / "_ground_truth.json") in err and "prepare_data.py" in err
