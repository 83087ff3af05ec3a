"""Config validation, file loading and overrides; the model section's variant union and its rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pipelines.cli import format_validation_error
from pipelines.config import TrainJobConfig
from sd_detr.config import (
    SD_DETR_FIELDS,
    ConditionalDetrModelConfig,
    DetectorConfig,
    LossConfig,
    SDDetrModelConfig,
    TransformerConfig,
    apply_overrides,
    error_location,
    flatten_config,
    load_config,
    parse_model_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BASE_CONFIGS = sorted(CONFIGS.glob("*.yaml"))
VARIANT_CONFIGS = sorted((CONFIGS / "variants").glob("*.yaml"))


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


@pytest.mark.parametrize("override", [".=1", "a..b=1", "a.=1", ".a=1", "a. .b=1"])
def test_override_with_an_empty_key_segment_is_an_error(override: str) -> None:
    with pytest.raises(ValueError, match="empty segment") as error:
        apply_overrides({}, [override])
    assert repr(override) in str(error.value)


def test_override_values_are_json_shaped_wherever_they_stand() -> None:
    """A YAML date is its string form as the last override too, not only before another one."""
    date_first = apply_overrides({}, ["a.day=2026-12-01", "b=3"])
    date_last = apply_overrides({}, ["b=3", "a.day=2026-12-01"])
    assert date_first == date_last == {"a": {"day": "2026-12-01"}, "b": 3}
    assert apply_overrides({}, ["a={when: 2026-12-01 10:00:00, days: [2026-12-02]}"]) == {
        "a": {"when": "2026-12-01 10:00:00", "days": ["2026-12-02"]}
    }


def test_d_model_must_be_a_multiple_of_four() -> None:
    """The sine position embeddings split d_model / 2 features per coordinate into sin/cos pairs."""
    with pytest.raises(ValidationError, match="multiple of 4"):
        TransformerConfig(d_model=18, num_heads=2)
    assert TransformerConfig(d_model=20, num_heads=2).d_model == 20


def test_every_variant_config_loads() -> None:
    variants = {p.stem: load_config(DetectorConfig, p) for p in VARIANT_CONFIGS}
    assert isinstance(variants["conditional_detr"].model, ConditionalDetrModelConfig)
    assert variants["conditional_detr"].loss.align_loss_weight == 0.0
    assert (variants["sd_detr"].model.taq, variants["sd_detr"].loss.align_loss_weight) == (True, 1.0)
    assert (variants["ablation_dfl"].model.taq, variants["ablation_dfl"].loss.align_loss_weight) == (False, 0.0)
    assert (variants["ablation_dfl_taq"].model.taq, variants["ablation_dfl_taq"].loss.align_loss_weight) == (True, 0.0)


# ---- the variant union ------------------------------------------------------------------------------------


def test_missing_variant_means_sd_detr() -> None:
    config = load_config(DetectorConfig, overrides=["model.num_queries=30"])
    assert isinstance(config.model, SDDetrModelConfig)
    assert (config.model.variant, config.model.num_queries, config.model.taq) == ("sd_detr", 30, True)
    assert isinstance(DetectorConfig().model, SDDetrModelConfig)
    assert isinstance(parse_model_config({"num_classes": 3}), SDDetrModelConfig)
    assert isinstance(parse_model_config({"variant": "conditional_detr"}), ConditionalDetrModelConfig)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("taq", "false"),
        ("taq", "true"),
        ("query_split", "0"),
        ("query_split", "2"),
        ("taq_num_points", "4"),
        ("taq_proposal_size", "0.2"),
    ],
)
def test_sd_detr_field_with_baseline_is_an_error(field: str, value: str) -> None:
    """Any value counts, also the ones that would do nothing in a baseline (taq=false, query_split=0)."""
    with pytest.raises(ValidationError) as error:
        load_config(DetectorConfig, overrides=["model.variant=conditional_detr", f"model.{field}={value}"])
    message = format_validation_error(error.value)
    assert f"model.{field}" in message and "SD-DETR part" in message
    assert "model.conditional_detr" not in message  # the union tag is not shown as a field path


def test_unknown_variant_names_the_tags() -> None:
    with pytest.raises(ValidationError) as error:
        load_config(DetectorConfig, overrides=["model.variant=detr"])
    message = format_validation_error(error.value)
    assert "model:" in message and "'detr'" in message and "'conditional_detr'" in message


def test_alignment_weight_defaults_per_variant() -> None:
    assert load_config(DetectorConfig).loss.align_loss_weight == 1.0
    baseline = load_config(DetectorConfig, overrides=["model.variant=conditional_detr"])
    assert baseline.loss.align_loss_weight == 0.0
    explicit_zero = load_config(
        DetectorConfig, overrides=["model.variant=conditional_detr", "loss.align_loss_weight=0"]
    )
    assert explicit_zero.loss.align_loss_weight == 0.0
    built = DetectorConfig(model=ConditionalDetrModelConfig(), loss=LossConfig(class_weight=3.0))
    assert (built.loss.align_loss_weight, built.loss.class_weight) == (0.0, 3.0)
    assert LossConfig().align_loss_weight == 1.0  # a bare loss section keeps SD-DETR's default


def test_nonzero_alignment_weight_with_baseline_is_an_error() -> None:
    with pytest.raises(ValidationError) as error:
        load_config(DetectorConfig, overrides=["model.variant=conditional_detr", "loss.align_loss_weight=0.5"])
    message = format_validation_error(error.value)
    assert "loss:" in message and "loss.align_loss_weight=0.5" in message and "SD-DETR part" in message
    with pytest.raises(ValidationError, match="align_loss_weight"):
        DetectorConfig(model=ConditionalDetrModelConfig(), loss=LossConfig(align_loss_weight=1.0))


@pytest.mark.parametrize("base", [p.name for p in BASE_CONFIGS])
def test_base_configs_leave_variant_fields_unset(base: str) -> None:
    """A base file that set an SD-DETR field would make every variant layered over it carry that value."""
    data = yaml.safe_load((CONFIGS / base).read_text())
    assert not set(SD_DETR_FIELDS) & set(data.get("model", {}))
    assert "align_loss_weight" not in data.get("loss", {})


@pytest.mark.parametrize("base", [p.name for p in BASE_CONFIGS])
@pytest.mark.parametrize("variant", [p.name for p in VARIANT_CONFIGS])
def test_every_variant_layers_over_every_base(base: str, variant: str) -> None:
    config = load_config(TrainJobConfig, [CONFIGS / base, CONFIGS / "variants" / variant])
    alone = load_config(DetectorConfig, CONFIGS / "variants" / variant)
    assert config.model.variant == alone.model.variant
    assert config.loss.align_loss_weight == alone.loss.align_loss_weight
    if isinstance(alone.model, SDDetrModelConfig):
        assert (config.model.taq, config.model.query_split) == (alone.model.taq, alone.model.query_split)


def test_readme_baseline_command_is_a_clean_baseline() -> None:
    """`--config configs/coco_r50.yaml --config configs/variants/conditional_detr.yaml`: the paper's recipe with
    the Conditional DETR decoder and nothing of SD-DETR."""
    config = load_config(TrainJobConfig, [CONFIGS / "coco_r50.yaml", CONFIGS / "variants" / "conditional_detr.yaml"])
    assert type(config.model) is ConditionalDetrModelConfig
    assert config.loss.align_loss_weight == 0.0
    dumped = config.model_dump(mode="json")
    assert not set(SD_DETR_FIELDS) & set(dumped["model"])
    assert (config.model.num_queries, config.model.backbone.name, config.optimizer.epochs) == (300, "resnet50", 50)
    paper = load_config(TrainJobConfig, CONFIGS / "coco_r50.yaml")
    assert type(paper.model) is SDDetrModelConfig
    assert (paper.model.taq, paper.model.query_split, paper.model.taq_num_points) == (True, 0, 4)
    assert paper.loss.align_loss_weight == 1.0
    assert paper.model_dump(exclude={"model", "loss"}) == config.model_dump(exclude={"model", "loss"})


@pytest.mark.parametrize("variant", [p.name for p in VARIANT_CONFIGS])
def test_config_round_trips_through_json(variant: str) -> None:
    """Checkpoints store the job config as JSON text; tune passes it as JSON data without unset fields."""
    config = load_config(TrainJobConfig, [CONFIGS / "default.yaml", CONFIGS / "variants" / variant])
    assert TrainJobConfig.model_validate(config.model_dump(mode="json")) == config
    assert TrainJobConfig.model_validate_json(config.model_dump_json()) == config
    assert TrainJobConfig.model_validate(json.loads(json.dumps(config.model_dump(mode="json")))) == config
    assert TrainJobConfig.model_validate(config.model_dump(mode="json", exclude_unset=True)) == config


def test_variant_survives_a_dump_without_unset_fields() -> None:
    """A baseline built in code (variant left at its class default) must not come back as SD-DETR."""
    config = DetectorConfig(model=ConditionalDetrModelConfig(num_queries=5))
    again = DetectorConfig.model_validate(config.model_dump(exclude_unset=True))
    assert type(again.model) is ConditionalDetrModelConfig and again == config


def test_flatten_lists_only_the_fields_of_the_variant() -> None:
    baseline = flatten_config(load_config(DetectorConfig, overrides=["model.variant=conditional_detr"]))
    assert baseline["model.variant"] == "conditional_detr" and baseline["loss.align_loss_weight"] == "0.0"
    assert not any(f"model.{name}" in baseline for name in SD_DETR_FIELDS)
    sd = flatten_config(load_config(DetectorConfig))
    assert (sd["model.variant"], sd["model.taq"], sd["model.query_split"], sd["model.taq_num_points"]) == (
        "sd_detr",
        "True",
        "0",
        "4",
    )
    assert sd["model.backbone.pretrained"] == "True" and sd["model.backbone.weights_path"] == "None"


def test_error_location_drops_the_union_tag() -> None:
    assert error_location(("model", "sd_detr", "transformer", "num_heads")) == "model.transformer.num_heads"
    assert error_location(("model", "conditional_detr")) == "model"
    assert error_location(("loss", "align_loss_weight")) == "loss.align_loss_weight"
    with pytest.raises(ValidationError) as error:
        load_config(DetectorConfig, overrides=["model.transformer.num_heads=7"])
    assert "  model.transformer:" in format_validation_error(error.value)


# ---- backbone weights fields ------------------------------------------------------------------------------


def test_weights_path_with_pretrained_false_is_a_contradiction() -> None:
    with pytest.raises(ValidationError) as error:
        load_config(
            DetectorConfig, overrides=["model.backbone.pretrained=false", "model.backbone.weights_path=r50.pth"]
        )
    message = format_validation_error(error.value)
    assert "model.backbone" in message and "pretrained=false" in message and "r50.pth" in message


def test_default_job_states_its_random_backbone_and_paper_config_expects_weights() -> None:
    default = load_config(TrainJobConfig, CONFIGS / "default.yaml").model.backbone
    assert (default.norm, default.pretrained, default.weights_path) == ("group_norm", False, None)
    assert "pretrained" in yaml.safe_load((CONFIGS / "default.yaml").read_text())["model"]["backbone"]
    paper = load_config(TrainJobConfig, CONFIGS / "coco_r50.yaml").model.backbone
    assert (paper.norm, paper.pretrained, paper.weights_path) == ("frozen_batchnorm", True, None)


def test_absolute_paths_include_the_weights_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(TrainJobConfig, CONFIGS / "default.yaml", ["model.backbone.pretrained=true",
                                                                    "model.backbone.weights_path=w/r18.pth"])  # fmt: skip
    absolute = config.with_absolute_paths()
    assert absolute.model.backbone.weights_path == tmp_path / "w" / "r18.pth"
    assert type(absolute.model) is type(config.model) and absolute.model.num_queries == config.model.num_queries
