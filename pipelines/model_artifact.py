"""The files of a registered SD-DETR model: weights as safetensors, everything else as JSON. No pickle.

A model directory (the ``artifacts`` of the MLflow pyfunc model that `pipelines/serving.py` logs) holds:

    model.safetensors       the detector's ``state_dict`` (float tensors, safetensors format)
    detector_config.json    the detector config (``sd_detr.config.DetectorConfig``: model, matcher, loss, optimizer)
    categories.json         ``[{"id": int, "name": str}, ...]``: COCO category id and name of each label 0..C-1
    eval_transform.json     the eval resize and normalization (``eval_size``, ``eval_max_size`` px; ``mean``,
                            ``std`` of RGB in [0, 1])

Reading them builds the model with the installed project's code: nothing in the files is executed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sd_detr.backbone_weights import without_backbone_weights
from sd_detr.config import DetectorConfig, with_saved_config_defaults
from sd_detr.data.config import AugmentationConfig
from sd_detr.data.meta import load_meta
from sd_detr.data.shards import iter_row_groups, read_row_group
from sd_detr.model import Detector, build_detector

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"
WEIGHTS = "weights"
DETECTOR_CONFIG = "detector_config"
CATEGORIES = "categories"
EVAL_TRANSFORM = "eval_transform"
FILE_NAMES = {
    WEIGHTS: "model.safetensors",
    DETECTOR_CONFIG: "detector_config.json",
    CATEGORIES: "categories.json",
    EVAL_TRANSFORM: "eval_transform.json",
}
"""Artifact key -> file name. The keys are the names of the pyfunc model's ``artifacts``."""


class ModelArtifactError(ValueError):
    """The files of a model directory are missing, unreadable or inconsistent with each other."""


class CategoryEntry(BaseModel):
    """One category of the model's output: label index = position in ``categories.json``."""

    model_config = ConfigDict(extra="forbid")

    id: int = Field(description="COCO category id reported in detections.")
    name: str = Field(description="Category name.")


class EvalTransform(BaseModel):
    """The eval preprocessing the model was trained with (pixels of the decoded image)."""

    model_config = ConfigDict(extra="forbid")

    eval_size: int = Field(gt=0, description="Shorter side is resized to this many px.")
    eval_max_size: int = Field(gt=0, description="Longer side is capped at this many px.")
    mean: tuple[float, float, float] = Field(description="RGB mean subtracted after scaling to [0, 1].")
    std: tuple[float, float, float] = Field(description="RGB std divided by after scaling to [0, 1].")


@dataclass
class LoadedModel:
    """A detector with what inference needs: category ids per label and the eval resize."""

    model: Detector
    category_ids: list[int]
    category_names: list[str]
    augmentation: AugmentationConfig


def write_model_files(
    directory: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    detector_config: DetectorConfig,
    categories: list[CategoryEntry],
    augmentation: AugmentationConfig,
) -> dict[str, str]:
    """Write the four model files into ``directory`` (created); returns {artifact key: file path}.

    ``detector_config`` may be a subclass (e.g. the training job config): only the detector fields are
    written, without ``model.backbone.weights_path`` (the backbone's weights are in the safetensors file). The state dict's tensors are copied to contiguous CPU tensors (safetensors stores no views).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = detector_config.model_dump(mode="json", include=set(DetectorConfig.model_fields))
    data["model"]["backbone"]["weights_path"] = None  # a file on the training machine; the weights are below
    config = DetectorConfig.model_validate(data)
    if len(categories) != config.model.num_classes:
        raise ModelArtifactError(
            f"{len(categories)} categories for a model with num_classes={config.model.num_classes}"
        )
    paths = {key: str(directory / name) for key, name in FILE_NAMES.items()}
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
    save_file(tensors, paths[WEIGHTS], metadata={"format": "pt", "sd_detr_format_version": FORMAT_VERSION})
    Path(paths[DETECTOR_CONFIG]).write_text(config.model_dump_json(indent=2))
    Path(paths[CATEGORIES]).write_text(json.dumps([c.model_dump() for c in categories], indent=2))
    transform = EvalTransform(
        eval_size=augmentation.eval_size,
        eval_max_size=augmentation.eval_max_size,
        mean=tuple(augmentation.mean),
        std=tuple(augmentation.std),
    )
    Path(paths[EVAL_TRANSFORM]).write_text(transform.model_dump_json(indent=2))
    return paths


def read_model_files(paths: Mapping[str, str | Path]) -> LoadedModel:
    """Build the :class:`LoadedModel` of files written by :func:`write_model_files` (CPU, eval mode).

    Args:
        paths: artifact key -> local file path (the pyfunc ``context.artifacts``, or a directory's files).
    Raises:
        ModelArtifactError: a file is missing, does not parse, or the weights do not fit the config.
    """
    missing = [key for key in FILE_NAMES if key not in paths or not Path(paths[key]).is_file()]
    if missing:
        raise ModelArtifactError(f"model files missing: {missing} (have {dict(paths)})")
    try:
        saved = json.loads(Path(paths[DETECTOR_CONFIG]).read_text())
        if not isinstance(saved, dict):
            raise ModelArtifactError(f"{paths[DETECTOR_CONFIG]} must hold a JSON object")
        config = DetectorConfig.model_validate(with_saved_config_defaults(saved))
        raw_categories = json.loads(Path(paths[CATEGORIES]).read_text())
        if not isinstance(raw_categories, list):
            raise ModelArtifactError(f"{paths[CATEGORIES]} must hold a JSON list of {{id, name}} objects")
        categories = [CategoryEntry.model_validate(entry) for entry in raw_categories]
        transform = EvalTransform.model_validate_json(Path(paths[EVAL_TRANSFORM]).read_text())
    except (ValidationError, json.JSONDecodeError) as error:
        raise ModelArtifactError(f"unreadable model config files: {error}") from error
    if len(categories) != config.model.num_classes:
        raise ModelArtifactError(
            f"{paths[CATEGORIES]} lists {len(categories)} categories, the model has {config.model.num_classes} classes"
        )
    try:
        state = load_file(str(paths[WEIGHTS]), device="cpu")
    except (SafetensorError, OSError) as error:
        raise ModelArtifactError(f"unreadable weights {paths[WEIGHTS]}: {error}") from error
    # the weights file holds the whole trained model: a backbone weights_path in the JSON (a file on some
    # other machine, or any file a registrant names) is never opened
    model = build_detector(without_backbone_weights(config.model))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ModelArtifactError(f"the weights do not fit the detector config: {str(error)[:1000]}") from error
    augmentation = AugmentationConfig(
        eval_size=transform.eval_size, eval_max_size=transform.eval_max_size, mean=transform.mean, std=transform.std
    )
    logger.debug("loaded %s tensors for a %s detector", len(state), config.model.variant)
    return LoadedModel(model.eval(), [c.id for c in categories], [c.name for c in categories], augmentation)


def first_image_bytes(dataset_dir: str | Path) -> bytes:
    """The encoded bytes of the first image of a shard dataset (the model's input example)."""
    meta = load_meta(dataset_dir)
    for path, index in iter_row_groups(meta.shard_paths(Path(dataset_dir))):
        rows = read_row_group(path, index, columns=["image"])
        if rows:
            return rows[0]["image"]
    raise ModelArtifactError(f"{dataset_dir} holds no image for the model's input example")


def write_checkpoint_model_files(
    directory: str | Path,
    model_state: Mapping[str, torch.Tensor],
    job_config: DetectorConfig,
    val_dir: Path,
    augmentation: AugmentationConfig,
) -> tuple[dict[str, str], bytes]:
    """The model files of a training checkpoint (categories from the val shards) and the first val image as
    the input example: ``(artifact key -> path, encoded image)``."""
    categories = [CategoryEntry(id=c.id, name=c.name) for c in load_meta(val_dir).categories]
    paths = write_model_files(directory, model_state, job_config, categories, augmentation)
    return paths, first_image_bytes(val_dir)


def model_file_paths(directory: str | Path) -> dict[str, str]:
    """{artifact key: path} of the model files in ``directory`` (whether or not they exist)."""
    return {key: str(Path(directory) / name) for key, name in FILE_NAMES.items()}
