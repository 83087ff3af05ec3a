"""A tiny SD-DETR registered as the pipeline registers it (pyfunc model of safetensors + JSON), for tests."""

from __future__ import annotations

import uuid
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipelines.model_artifact import CategoryEntry, LoadedModel, read_model_files, write_model_files
from pipelines.serving import example_image
from pipelines.tracking import register_model
from sd_detr.config import DetectorConfig, apply_overrides
from sd_detr.data.config import AugmentationConfig
from sd_detr.model import build_detector
from tests.pipeline_helpers import TINY_OVERRIDES

TINY_MODEL_OVERRIDES = [item for item in TINY_OVERRIDES if item.startswith("model.")]
EVAL_AUGMENTATION = AugmentationConfig(eval_size=128, eval_max_size=256)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def tiny_model_files(
    directory: Path, categories: list[tuple[int, str]] = ((1, "circle"), (3, "square"), (7, "triangle")), seed: int = 0
) -> tuple[dict[str, str], LoadedModel]:
    """Write the model files of a randomly initialised tiny detector; returns (paths, the files read back)."""
    overrides = [*TINY_MODEL_OVERRIDES, f"model.num_classes={len(categories)}"]
    config = DetectorConfig.model_validate(apply_overrides({}, overrides))
    model = build_detector(config.model, seed=seed)
    entries = [CategoryEntry(id=category_id, name=name) for category_id, name in categories]
    paths = write_model_files(directory, model.state_dict(), config, entries, EVAL_AUGMENTATION)
    return paths, read_model_files(paths)


def register_tiny_model(
    uri: str, model_name: str, val_ap: float, directory: Path, alias: str = "champion", seed: int = 0, **kwargs
) -> tuple[str, bool, LoadedModel]:
    """Register a tiny detector as a new version of ``model_name`` in a fresh run, through
    :func:`pipelines.tracking.register_model`; returns (version, aliased, the model as loaded from its files)."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(f"exp-{model_name}")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(f"exp-{model_name}")
    run_id = client.create_run(experiment_id).info.run_id
    paths, loaded = tiny_model_files(directory, seed=seed, **kwargs)
    version, aliased = register_model(
        uri, run_id, paths, example_image(), model_name, alias, val_ap, {"epoch": 0, "val_AP": val_ap}
    )
    client.set_terminated(run_id)
    return version, aliased, loaded
