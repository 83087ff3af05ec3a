"""Load a trained detector (registry URI or Ray checkpoint) and run it on image files.

A registered model is read as data: its safetensors weights and JSON configs are downloaded and the detector
is built with this project's code. Nothing from the registry is unpickled or executed (the model's code file
is ignored here; `mlflow.pyfunc.load_model` is the way that runs it).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import mlflow
import torch
import yaml
from torchvision import tv_tensors

from pipelines.config import TrainJobConfig
from pipelines.mlflow_uris import fluent_uris
from pipelines.model_artifact import FILE_NAMES, LoadedModel, ModelArtifactError, read_model_files
from sd_detr.backbone_weights import without_backbone_weights
from sd_detr.data.collate import pad_and_collate
from sd_detr.data.meta import load_meta
from sd_detr.data.samples import decode_image
from sd_detr.data.transforms import build_eval_transform
from sd_detr.engine import predict
from sd_detr.model import build_detector

__all__ = ["LoadedModel", "Predictor", "list_images", "load_checkpoint_model", "load_model", "load_registered_model"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


PYFUNC_LOADER_MODULE = "mlflow.pyfunc.loaders.code_model"  # models-from-code, no pickled object


def load_model_directory(directory: str | Path) -> LoadedModel:
    """A downloaded MLflow model directory logged by `pipelines/serving.py` -> :class:`LoadedModel`.

    Reads only ``MLmodel`` (YAML) to find the artifact files, then the safetensors + JSON files.

    Raises:
        ModelArtifactError: not such a model (e.g. a pickled model from an older version of the pipeline).
    """
    directory = Path(directory).resolve()
    mlmodel = directory / "MLmodel"
    if not mlmodel.is_file():
        raise ModelArtifactError(f"{directory} is not an MLflow model directory (no MLmodel file)")
    flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
    artifacts = flavor.get("artifacts") or {}
    if flavor.get("loader_module") != PYFUNC_LOADER_MODULE or not set(FILE_NAMES) <= set(artifacts):
        raise ModelArtifactError(
            f"{directory} was not logged by this pipeline's pyfunc model (needs the artifacts {sorted(FILE_NAMES)}; "
            f"found flavors {sorted((yaml.safe_load(mlmodel.read_text()) or {}).get('flavors', {}))}). Models "
            "logged as pickles are not loaded: register the checkpoint again with the current pipeline."
        )
    paths = {}
    for key in FILE_NAMES:
        path = (directory / str(artifacts[key]["path"])).resolve()
        if not path.is_relative_to(directory):
            raise ModelArtifactError(f"artifact {key!r} points outside the model directory: {artifacts[key]['path']}")
        paths[key] = path
    return read_model_files(paths)


def load_registered_model(model_uri: str, tracking_uri: str | None = None) -> LoadedModel:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` -> :class:`LoadedModel` (CPU, eval mode).

    Downloads the model's files to a temporary directory and builds the detector from them (no pickle, no
    code from the registry).
    """
    with tempfile.TemporaryDirectory(prefix="sd-detr-model-") as scratch:
        with fluent_uris(tracking_uri or mlflow.get_tracking_uri()):
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=scratch)
        return load_model_directory(local)


def load_checkpoint_model(checkpoint_dir: str | Path) -> LoadedModel:
    """A Ray Train checkpoint directory of `pipelines/train.py` -> :class:`LoadedModel`."""
    from pipelines.checkpoint import checkpoint_config_json, load_checkpoint_state  # torch.load(weights_only=True)

    state = load_checkpoint_state(checkpoint_dir)
    # the fields the checkpoint predates at the values it was trained with (a default that moved since, e.g.
    # model.taq_proposal_size, is no weight: load_state_dict would not notice)
    cfg = TrainJobConfig.model_validate(checkpoint_config_json(checkpoint_dir))
    model = build_detector(without_backbone_weights(cfg.model))  # the checkpoint holds the trained backbone
    model.load_state_dict(state["model"])
    meta = load_meta(cfg.data.val_dir)
    return LoadedModel(model.eval(), meta.category_ids.tolist(), meta.category_names, cfg.data.augmentation)


def load_model(source: str, tracking_uri: str | None = None) -> LoadedModel:
    """A registry URI (``models:/...``), a downloaded MLflow model directory or a checkpoint directory."""
    if source.startswith("models:/"):
        return load_registered_model(source, tracking_uri)
    if not Path(source).is_dir():
        raise FileNotFoundError(f"{source} is neither a models:/ URI nor a model or checkpoint directory")
    if (Path(source) / "MLmodel").is_file():
        return load_model_directory(source)
    return load_checkpoint_model(source)


def list_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files given directly or found (non-recursively) in given folders, sorted; missing paths raise."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files.extend(sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"no such image or folder: {item}")
    return files


class Predictor:
    """Decode, resize (eval transform), batch and run a :class:`LoadedModel` on encoded images."""

    def __init__(self, loaded: LoadedModel, device: str | torch.device = "cpu", top_k: int = 100) -> None:
        self.loaded = loaded
        self.device = torch.device(device)
        self.model = loaded.model.to(self.device).eval()
        self.transform = build_eval_transform(loaded.augmentation)
        self.label_to_category_id = torch.tensor(loaded.category_ids, dtype=torch.int64)
        self.top_k = top_k

    def __call__(
        self, encoded_images: Sequence[bytes], top_k: int | None = None
    ) -> list[dict[str, torch.Tensor] | None]:
        """Detections (``scores``, ``labels`` = category ids, ``boxes`` xyxy original pixels) per image, at most
        ``top_k`` each (None: the predictor's); None for bytes that do not decode. Changes no state: threads
        may share a predictor."""
        samples, positions = [], []
        for position, data in enumerate(encoded_images):
            try:
                pixels, (height, width) = decode_image(data)
            except ValueError:
                continue
            image = tv_tensors.Image(torch.from_numpy(pixels).permute(2, 0, 1))
            target = {
                "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(height, width)),
                "labels": torch.zeros(0, dtype=torch.int64),
                "image_id": torch.tensor(position),
                "orig_size": torch.tensor([height, width]),
            }
            samples.append(self.transform(image, target))
            positions.append(position)
        results: list[dict[str, torch.Tensor] | None] = [None] * len(encoded_images)
        if samples:
            batch = pad_and_collate(samples).to(self.device)
            orig_sizes = torch.stack([t["orig_size"] for t in batch.targets])
            detections = predict(self.model, batch.images, batch.padding_mask, orig_sizes, self.label_to_category_id,
                                 self.top_k if top_k is None else top_k)  # fmt: skip
            for position, detection in zip(positions, detections, strict=True):
                results[position] = {k: v.cpu() for k, v in detection.items()}
        return results
