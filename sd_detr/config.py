"""Typed configuration of the detector: one pydantic tree, defaults in the fields, validated on load.

The root :class:`DetectorConfig` holds the model (backbone, transformer, decoder variant), the matcher
costs, the loss weights and the optimizer recipe. Defaults follow the paper's recipe (docs/method.md).
Configs load from YAML or JSON files and take ``key.path=value`` overrides whose values are parsed as
YAML scalars (``model.transformer.d_model=128``, ``optimizer.lr_drop_epochs=[40]``). Unknown keys are
errors, so a typo never silently keeps a default.

The ``model`` section is a union discriminated by ``model.variant`` (``sd_detr`` when absent): the SD-DETR
switches (``query_split``, ``taq``, ``taq_num_points``, ``taq_proposal_size``) exist only in
:class:`SDDetrModelConfig`, so a ``conditional_detr`` baseline that carries one is an error, never a silently
ignored value. Likewise the alignment loss weight defaults to 1.0 for ``sd_detr`` and to 0.0 for
``conditional_detr``, where a non-zero value is an error.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are rejected, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


BackboneName = Literal[
    "resnet10",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "regnet_x_400mf",
    "regnet_y_400mf",
]


def backbone_family(name: str) -> Literal["resnet", "mobilenet", "regnet"]:
    """The torchvision family of a backbone name: ``resnet``, ``mobilenet`` (MobileNetV3) or ``regnet``."""
    if name.startswith("resnet"):
        return "resnet"
    if name.startswith("mobilenet_v3"):
        return "mobilenet"
    if name.startswith("regnet"):
        return "regnet"
    raise ValueError(f"model.backbone.name: unknown backbone {name!r}")


class BackboneConfig(StrictModel):
    """torchvision backbone (ResNet-10/18/34/50/101, MobileNetV3 small/large, RegNet X/Y 400MF), with frozen
    BatchNorm for ImageNet weights or GroupNorm from scratch.

    Every backbone is split into five units, stem and layer1..layer4 (output strides 2-4 / 4 / 8 / 16 / 32;
    ``sd_detr.backbone``): ResNet's stem and stages, RegNet's stem and trunk blocks 1-4, MobileNetV3's
    feature blocks grouped by output stride. ``trainable_layers`` and ``feature_level`` mean the same for all.

    Where its weights come from is explicit: ``weights_path`` names a torchvision state_dict file of the family
    (``pretrained: true``, the default), or ``pretrained: false`` says the backbone starts from random
    weights. A training job accepts nothing in between (``sd_detr.backbone_weights.require_backbone_init``);
    a bare model built in code (tests, tools) may leave both unset and gets a random backbone.
    """

    name: BackboneName = Field(
        "resnet50",
        description="torchvision backbone: resnet10 (torchvision ResNet, basic blocks [1, 1, 1, 1]) / 18 / 34 / 50 "
        "/ 101, mobilenet_v3_small / large, regnet_x_400mf / regnet_y_400mf.",
    )
    trainable_layers: int = Field(
        3,
        ge=0,
        le=5,
        description="How many of [layer4, layer3, layer2, layer1, stem] train (3 = layer2..4); for MobileNetV3 "
        "the units are its blocks grouped by output stride 32/16/8/4/2, for RegNet trunk blocks 4..1 and stem.",
    )
    dilation: bool = Field(False, description="DC5: dilate layer4 (stride 16 instead of 32); ResNet-50/101 only.")
    norm: Literal["frozen_batchnorm", "group_norm"] = Field(
        "frozen_batchnorm",
        description="frozen_batchnorm for pretrained weights (DETR); group_norm to train from scratch (32 groups, "
        "or the largest divisor of the channels below 32 where 32 does not divide: MobileNetV3 / RegNet widths).",
    )
    feature_level: Literal["c5", "c4", "c3"] = Field(
        "c5",
        description="Output of layer4 (C5, stride 32), layer3 (C4, stride 16, the last block at stride 16; "
        "layer4 dropped) or layer2 (C3, stride 8; layer3 and layer4 dropped: for small images).",
    )
    weights_path: Path | None = Field(
        None,
        description="Local state_dict file of the torchvision model named by `name`, with torchvision's key names (.pth/.pt via "
        "torch.load(weights_only=True), or .safetensors); never downloaded. Required by a training job unless "
        "pretrained=false.",
    )
    pretrained: bool = Field(
        True,
        description="The backbone starts from the weights in weights_path. false = random initialisation, an "
        "explicit choice that training warns about (ImageNet-statistics frozen BatchNorm on random weights is "
        "meaningless; use norm=group_norm and trainable_layers=5 to train from scratch).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> BackboneConfig:
        if not self.pretrained and self.weights_path is not None:
            raise ValueError(
                f"model.backbone.weights_path ({self.weights_path}) is set but model.backbone.pretrained=false: "
                "remove one of the two (weights are either loaded or not)"
            )
        if self.dilation and self.name not in ("resnet50", "resnet101"):
            why = "has basic blocks" if backbone_family(self.name) == "resnet" else "is not a ResNet"
            raise ValueError(
                f"backbone.dilation (DC5) needs resnet50/101; {self.name} {why} (use feature_level=c4 for stride 16)"
            )
        if self.dilation and self.feature_level != "c5":
            raise ValueError(
                f"backbone.dilation dilates layer4, which backbone.feature_level={self.feature_level} drops"
            )
        return self


class TransformerConfig(StrictModel):
    """Encoder/decoder sizes shared by both variants."""

    d_model: int = Field(
        256, gt=0, description="Width of the transformer (channels of the projected features); a multiple of 4."
    )
    num_heads: int = Field(8, gt=0, description="Attention heads; must divide d_model (and 2*d_model).")
    num_encoder_layers: int = Field(6, ge=0, description="Post-norm encoder layers.")
    num_decoder_layers: int = Field(6, ge=1, description="Decoder layers (each gives an auxiliary output).")
    ffn_dim: int = Field(2048, gt=0, description="Hidden width of the feed-forward blocks.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout in attention outputs and FFNs.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TransformerConfig:
        if self.d_model % self.num_heads != 0:
            raise ValueError(
                f"transformer.d_model ({self.d_model}) must be divisible by transformer.num_heads ({self.num_heads})"
            )
        if self.d_model % 4 != 0:
            raise ValueError(
                f"transformer.d_model ({self.d_model}) must be a multiple of 4: the sine position embeddings give "
                "each coordinate d_model / 2 features in sin/cos pairs"
            )
        return self


SD_DETR_FIELDS: dict[str, str] = {
    "query_split": "the divided decoder (DFL)",
    "taq": "task-aware query generation (TAQ)",
    "taq_num_points": "TAQ's sampling points",
    "taq_proposal_size": "TAQ's cell proposals",
}
"""The ``model`` fields that exist only for ``variant: sd_detr``, and the SD-DETR part each one configures."""

ModelVariant = Literal["conditional_detr", "sd_detr"]
DEFAULT_VARIANT: ModelVariant = "sd_detr"


def model_variant(data: Any) -> Any:
    """The ``variant`` of a model section given as a mapping or a config object; ``sd_detr`` when absent
    (the discriminator of :data:`ModelConfig`)."""
    if isinstance(data, Mapping):
        return data.get("variant", DEFAULT_VARIANT)
    return getattr(data, "variant", DEFAULT_VARIANT)


def _with_variant(data: Any, variant: str) -> Any:
    """``data`` with ``variant`` filled in when absent, so that the variant always counts as explicitly set and
    survives ``model_dump(exclude_unset=True)`` (a dump without it would come back as the default variant)."""
    if isinstance(data, Mapping) and "variant" not in data:
        return {**data, "variant": variant}
    return data


class ModelConfigBase(StrictModel):
    """What both variants share: classes, slots, backbone, transformer sizes and the class-prior bias."""

    variant: ModelVariant = Field(
        DEFAULT_VARIANT, description="Decoder: Conditional DETR baseline or SD-DETR's divided decoder."
    )
    num_classes: int = Field(80, gt=0, description="Object classes (contiguous labels 0..C-1, no background).")
    num_queries: int = Field(300, gt=0, description="Object slots N.")
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    transformer: TransformerConfig = Field(default_factory=TransformerConfig)
    class_prior_prob: float = Field(
        0.01, gt=0.0, lt=1.0, description="Initial sigmoid probability of every class (focal-loss bias init)."
    )


class ConditionalDetrModelConfig(ModelConfigBase):
    """The Conditional DETR baseline: learned queries, one decoder stream, no SD-DETR part.

    An SD-DETR field (:data:`SD_DETR_FIELDS`) in this section is an error, so a baseline never carries one
    silently (e.g. from a base config file it is layered over).
    """

    variant: Literal["conditional_detr"] = Field(
        "conditional_detr", description="Decoder: the Conditional DETR baseline."
    )

    @model_validator(mode="before")
    @classmethod
    def _no_sd_detr_parts(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            present = [name for name in SD_DETR_FIELDS if name in data]
            if present:
                parts = "; ".join(f"model.{name} configures {SD_DETR_FIELDS[name]}" for name in present)
                raise PydanticCustomError(
                    "sd_detr_field",
                    "{fields} set with model.variant=conditional_detr: {parts}, an SD-DETR part the "
                    "Conditional DETR baseline does not have. Remove it (a base config must leave it unset) "
                    "or use model.variant=sd_detr",
                    {"fields": ", ".join(f"model.{name}" for name in present), "parts": parts},
                )
        return _with_variant(data, "conditional_detr")


class SDDetrModelConfig(ModelConfigBase):
    """SD-DETR (docs/method.md): the shared parts plus the divided decoder, TAQ and their switches."""

    variant: Literal["sd_detr"] = Field("sd_detr", description="Decoder: SD-DETR's divided decoder.")
    query_split: int = Field(
        0,
        ge=0,
        description="SD-DETR: first decoder layer whose cross-attention and FFN are divided by task; "
        "0 = divided in every layer (the paper), num_decoder_layers = never divided.",
    )
    taq: bool = Field(True, description="SD-DETR: task-aware query generation (False = learned query pairs).")
    taq_num_points: int = Field(4, gt=0, description="SD-DETR TAQ: sampling points M per anchor box and task.")
    taq_proposal_size: float = Field(
        0.2,
        gt=0.0,
        le=1.0,
        description="SD-DETR TAQ: side of every memory cell's proposal box, as a fraction of the image (the "
        "mini-detector regresses from it; two-stage Deformable DETR's side at stride 32). Configs saved before "
        "this field existed were made with 0.05 (sd_detr.config.SAVED_CONFIG_DEFAULTS).",
    )

    @model_validator(mode="before")
    @classmethod
    def _explicit_variant(cls, data: Any) -> Any:
        return _with_variant(data, "sd_detr")

    @model_validator(mode="after")
    def _query_split_in_range(self) -> SDDetrModelConfig:
        layers = self.transformer.num_decoder_layers
        if not 0 <= self.query_split <= layers:
            raise ValueError(
                f"model.query_split ({self.query_split}) must lie in [0, model.transformer.num_decoder_layers={layers}]"
            )
        return self


ModelConfig = Annotated[
    Annotated[SDDetrModelConfig, Tag("sd_detr")] | Annotated[ConditionalDetrModelConfig, Tag("conditional_detr")],
    Discriminator(model_variant),
]
"""The ``model`` section: :class:`SDDetrModelConfig` or :class:`ConditionalDetrModelConfig`, chosen by
``variant`` (``sd_detr`` when absent). Validate a bare section with :func:`parse_model_config`."""

_MODEL_ADAPTER: TypeAdapter[SDDetrModelConfig | ConditionalDetrModelConfig] = TypeAdapter(ModelConfig)


def parse_model_config(data: Any) -> SDDetrModelConfig | ConditionalDetrModelConfig:
    """Validate a ``model`` section (mapping or config object) into the config class of its variant."""
    return _MODEL_ADAPTER.validate_python(data)


SAVED_CONFIG_DEFAULTS: dict[str, Any] = {"taq_proposal_size": 0.05}
"""``model`` fields of ``variant: sd_detr`` added after configs were first saved with models and checkpoints,
each with the value that was built in before the field existed. A saved config without one was made with that
value, not with today's default."""


def with_saved_config_defaults(data: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config (a model artifact's or checkpoint's, as a dict) with every SD-DETR field it predates set
    to the value it was made with (:data:`SAVED_CONFIG_DEFAULTS`), so an old model loads as it was trained."""
    result = dict(data)
    model = result.get("model")
    if isinstance(model, Mapping) and model_variant(model) == "sd_detr":
        result["model"] = {**SAVED_CONFIG_DEFAULTS, **model}
    return result


# Sigmoid focal shape, defined once: the matcher's class cost (``matcher.focal_*``) and the classification
# loss (``loss.focal_*``) each carry a field of these types, with the same default and bounds.
FocalAlpha = Annotated[float, Field(0.25, ge=0.0, le=1.0, description="Focal alpha: weight of the positive class.")]
FocalGamma = Annotated[float, Field(2.0, ge=0.0, description="Focal gamma: down-weighting of easy examples.")]


class MatcherConfig(StrictModel):
    """Hungarian matching cost weights (docs/method.md); ``focal_alpha``/``focal_gamma`` shape the class cost."""

    class_cost: float = Field(2.0, ge=0.0, description="Weight of the focal classification cost.")
    bbox_cost: float = Field(5.0, ge=0.0, description="Weight of the L1 cost on normalized cxcywh boxes.")
    giou_cost: float = Field(2.0, ge=0.0, description="Weight of the negative-GIoU cost.")
    focal_alpha: FocalAlpha
    focal_gamma: FocalGamma

    @model_validator(mode="after")
    def _some_cost(self) -> MatcherConfig:
        if self.class_cost == 0 and self.bbox_cost == 0 and self.giou_cost == 0:
            raise ValueError("matcher: class_cost, bbox_cost and giou_cost cannot all be 0")
        return self


class LossConfig(StrictModel):
    """Loss weights; the total is summed over the final and every auxiliary decoder output.
    ``focal_alpha``/``focal_gamma`` shape the classification loss."""

    class_weight: float = Field(2.0, ge=0.0, description="Weight of the sigmoid focal loss.")
    bbox_weight: float = Field(5.0, ge=0.0, description="Weight of the L1 box loss.")
    giou_weight: float = Field(2.0, ge=0.0, description="Weight of the GIoU loss.")
    focal_alpha: FocalAlpha
    focal_gamma: FocalGamma
    aux_loss: bool = Field(True, description="Apply the losses to every decoder layer's output.")
    align_loss_weight: float = Field(
        1.0,
        ge=0.0,
        description="SD-DETR: weight of the alignment loss (0 removes the term exactly). Within a DetectorConfig "
        "the default is 1.0 for model.variant=sd_detr and 0.0 for conditional_detr, where non-zero is an error.",
    )
    align_alpha: float = Field(0.25, ge=0.0, description="Alignment target t = s^alpha * u^beta: alpha.")
    align_beta: float = Field(0.75, ge=0.0, description="Alignment target t = s^alpha * u^beta: beta.")
    align_gamma: float = Field(2.0, ge=0.0, description="Alignment loss: negatives weighted by s^gamma.")


class OptimizerConfig(StrictModel):
    """AdamW recipe with a step learning-rate drop (docs/method.md)."""

    lr: float = Field(1e-4, gt=0.0, description="Learning rate of the transformer and heads.")
    backbone_lr: float = Field(1e-5, ge=0.0, description="Learning rate of the backbone.")
    weight_decay: float = Field(1e-4, ge=0.0, description="AdamW weight decay.")
    grad_clip_norm: float = Field(0.1, ge=0.0, description="Max gradient L2 norm (0 = no clipping).")
    epochs: int = Field(50, gt=0, description="Training epochs.")
    lr_drop_epochs: list[int] = Field(default_factory=lambda: [40], description="Epochs where lr drops.")
    lr_drop_factor: float = Field(0.1, gt=0.0, le=1.0, description="Multiplier applied at each drop.")

    @model_validator(mode="after")
    def _drops_sorted(self) -> OptimizerConfig:
        if any(e < 0 for e in self.lr_drop_epochs):
            raise ValueError("optimizer.lr_drop_epochs must be non-negative")
        if list(self.lr_drop_epochs) != sorted(self.lr_drop_epochs):
            raise ValueError("optimizer.lr_drop_epochs must be sorted ascending")
        return self


class DetectorConfig(StrictModel):
    """Everything that defines the detector and how it learns (no data, cluster or tracking settings)."""

    model: ModelConfig = Field(default_factory=SDDetrModelConfig)
    matcher: MatcherConfig = Field(default_factory=MatcherConfig)
    loss: LossConfig = Field(default_factory=LossConfig, validate_default=True)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)

    @field_validator("loss")
    @classmethod
    def _alignment_only_for_sd_detr(cls, loss: LossConfig, info: ValidationInfo) -> LossConfig:
        """The baseline has no alignment loss: its weight defaults to 0.0 there and a non-zero one is an error.
        (Runs after ``model``, the field declared before it; skipped when ``model`` itself is invalid.)"""
        model = info.data.get("model")
        if model is None or model.variant != "conditional_detr":
            return loss
        if "align_loss_weight" not in loss.model_fields_set:
            return loss.model_copy(update={"align_loss_weight": 0.0})
        if loss.align_loss_weight != 0.0:
            raise ValueError(
                f"loss.align_loss_weight={loss.align_loss_weight:g} with model.variant=conditional_detr: the "
                "alignment loss is an SD-DETR part (TAL) the Conditional DETR baseline does not have; leave it "
                "unset (0.0 for the baseline) or use model.variant=sd_detr"
            )
        return loss


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def json_shaped(value: Any) -> Any:
    """A deep copy of ``value`` made of JSON types only: what a config file in JSON would hold. A value JSON
    has no type for (a YAML date or timestamp) becomes its string form (``2026-12-01``)."""
    return json.loads(json.dumps(value, default=str))


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"a.b.c=value"`` into ``(["a", "b", "c"], value)``: the value parsed as YAML (scalar, list or
    mapping) and made :func:`json_shaped`, so an override means the same wherever it stands in a list.

    Raises ``ValueError`` naming the override when there is no ``=`` or the key path has an empty segment
    (``=1``, ``.=1``, ``a..b=1``, ``a.=1``).
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {text!r} is not of the form key.path=value")
    path = key.strip().split(".")
    if not all(part.strip() for part in path):
        raise ValueError(f"override {text!r}: key path {key.strip()!r} has an empty segment (expected key.path=value)")
    return path, json_shaped(yaml.safe_load(raw)) if raw.strip() else ""


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a :func:`json_shaped` deep copy of ``data`` with each ``key.path=value`` override
    (:func:`parse_override`) set, in order (missing sections are created)."""
    result: dict[str, Any] = json_shaped(dict(data))
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return result


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON config file into a dict; an empty file gives ``{}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level")
    return data


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` laid over it: nested sections merge key by key, other values replace."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    cls: type[ConfigT],
    paths: str | Path | Sequence[str | Path] | None = None,
    overrides: Iterable[str] = (),
) -> ConfigT:
    """Build and validate ``cls`` from config files (later files override earlier ones key by key; nested sections merge)
    plus ``key.path=value`` overrides.

    Raises ``pydantic.ValidationError`` naming the offending field for invalid values.
    """
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    data: dict[str, Any] = {}
    for path in paths:
        data = deep_merge(data, read_config_file(path))
    return cls.model_validate(apply_overrides(data, overrides))


def error_location(loc: Sequence[int | str]) -> str:
    """The dotted field path of a pydantic error location, without the union tag that validation of the
    ``model`` section inserts (``("model", "sd_detr", "taq")`` -> ``"model.taq"``)."""
    parts = [str(part) for part in loc]
    for index in range(len(parts) - 1):
        if parts[index] == "model" and parts[index + 1] in ("sd_detr", "conditional_detr"):
            del parts[index + 1]
            break
    return ".".join(parts)


def flatten_config(config: BaseModel) -> dict[str, str]:
    """Flatten a config to ``{"model.transformer.d_model": "256", ...}`` (for tracking params)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), child)
        else:
            flat[prefix] = json.dumps(value) if isinstance(value, list) else str(value)

    walk("", config.model_dump(mode="json"))
    return flat
