"""Config validation, file loading and overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from sd_detr.config import DetectorConfig, flatten_config, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("loss.bbox_weight=-1", "bbox_weight"),
        ("loss.align_loss_weight=-0.5", "align_loss_weight"),
        ("matcher.giou_cost=-2", "giou_cost"),
        ("model.transformer.num_heads=7", "num_heads"),
        ("model.query_split=7", "query_split"),
        ("model.query_split=-1", "query_split"),
        ("model.backbone.dilation=true", "dilation"),
        ("model.backbone.name=resnet9", "name"),
        ("optimizer.lr=0", "lr"),
        ("model.not_a_field=3", "not_a_field"),
    ],
)
def test_invalid_values_name_the_field(override: str, field: str) -> None:
    with pytest.raises(ValidationError) as error:
        load_config(DetectorConfig, overrides=["model.backbone.name=resnet18", override])
    assert field in str(error.value)


def test_files_merge_in_order_and_overrides_win(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  num_classes: 4\n  transformer:\n    d_model: 64\n    num_heads: 4\n")
    config = load_config(
        DetectorConfig,
        [base, CONFIGS / "variants" / "ablation_dfl.yaml"],
        ["optimizer.lr_drop_epochs=[3, 5]", "model.transformer.num_decoder_layers=2"],
    )
    assert config.model.num_classes == 4
    assert config.model.transformer.d_model == 64
    assert config.model.variant == "sd_detr" and config.model.taq is False
    assert config.loss.align_loss_weight == 0.0
    assert config.optimizer.lr_drop_epochs == [3, 5]
    assert config.model.transformer.num_decoder_layers == 2


def test_json_config_and_flatten(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"loss": {"align_loss_weight": 0.5}}')
    flat = flatten_config(load_config(DetectorConfig, path))
    assert flat["loss.align_loss_weight"] == "0.5"
    assert flat["model.transformer.d_model"] == "256"


def test_missing_file_and_bad_override() -> None:
    with pytest.raises(FileNotFoundError):
        load_config(DetectorConfig, "no/such/file.yaml")
    with pytest.raises(ValueError, match=r"key\.path=value"):
        load_config(DetectorConfig, overrides=["model.num_classes"])


def test_every_variant_config_loads() -> None:
    variants = {p.stem: load_config(DetectorConfig, p) for p in (CONFIGS / "variants").glob("*.yaml")}
    assert variants["conditional_detr"].model.variant == "conditional_detr"
    assert (variants["sd_detr"].model.taq, variants["sd_detr"].loss.align_loss_weight) == (True, 1.0)
    assert (variants["ablation_dfl"].model.taq, variants["ablation_dfl"].loss.align_loss_weight) == (False, 0.0)
    assert (variants["ablation_dfl_taq"].model.taq, variants["ablation_dfl_taq"].loss.align_loss_weight) == (True, 0.0)
