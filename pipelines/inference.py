"""Load a trained detector (registry URI or Ray checkpoint) and run it on image files."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from torchvision import tv_tensors

from pipelines.config import TrainJobConfig
from pipelines.tracking import fluent_uris
from pipelines.worker import load_checkpoint_state
from sd_detr.data.collate import pad_and_collate
from sd_detr.data.config import AugmentationConfig
from sd_detr.data.meta import load_meta
from sd_detr.data.samples import decode_image
from sd_detr.data.transforms import build_eval_transform
from sd_detr.engine import predict
from sd_detr.model import Detector, build_detector

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass
class LoadedModel:
    """A detector with what inference needs: category ids per label and the eval resize."""

    model: Detector
    category_ids: list[int]
    category_names: list[str]
    augmentation: AugmentationConfig


def load_registered_model(model_uri: str, tracking_uri: str | None = None) -> LoadedModel:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` -> :class:`LoadedModel`."""
    with fluent_uris(tracking_uri or mlflow.get_tracking_uri()):
        model = mlflow.pytorch.load_model(model_uri, map_location="cpu")
        metadata = mlflow.models.get_model_info(model_uri).metadata or {}
    if "categories" not in metadata:
        raise ValueError(f"{model_uri} was not logged by pipelines/train.py (no categories in its metadata)")
    augmentation = AugmentationConfig(
        eval_size=metadata["eval_size"], eval_max_size=metadata["eval_max_size"],
        mean=tuple(metadata["mean"]), std=tuple(metadata["std"]),
    )  # fmt: skip
    categories = metadata["categories"]
    return LoadedModel(model.eval(), [c["id"] for c in categories], [c["name"] for c in categories], augmentation)


def load_checkpoint_model(checkpoint_dir: str | Path) -> LoadedModel:
    """A Ray Train checkpoint directory of `pipelines/train.py` -> :class:`LoadedModel`."""
    state = load_checkpoint_state(checkpoint_dir)
    cfg = TrainJobConfig.model_validate(json.loads(state["config"]))
    model = build_detector(cfg.model)
    model.load_state_dict(state["model"])
    meta = load_meta(cfg.data.val_dir)
    return LoadedModel(model.eval(), meta.category_ids.tolist(), meta.category_names, cfg.data.augmentation)


def load_model(source: str, tracking_uri: str | None = None) -> LoadedModel:
    """A registry URI (``models:/...``) or a checkpoint directory."""
    if source.startswith("models:/"):
        return load_registered_model(source, tracking_uri)
    if not Path(source).is_dir():
        raise FileNotFoundError(f"{source} is neither a models:/ URI nor a checkpoint directory")
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

    def __call__(self, encoded_images: Sequence[bytes]) -> list[dict[str, torch.Tensor] | None]:
        """Detections (``scores``, ``labels`` = category ids, ``boxes`` xyxy original pixels) per image;
        None for bytes that do not decode."""
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
                                 self.top_k)  # fmt: skip
            for position, detection in zip(positions, detections, strict=True):
                results[position] = {k: v.cpu() for k, v in detection.items()}
        return results
