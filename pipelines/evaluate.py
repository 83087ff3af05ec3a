"""COCO AP of a trained model on a shard dataset.

    python pipelines/evaluate.py --model models:/sd-detr-synthetic@champion --data data/synthetic/val
    python pipelines/evaluate.py --model ray_results/sd-detr-synthetic/checkpoint_... --data DIR --out stats.json

The ground truth is the COCO json the shards were converted from (recorded in the shards' _meta.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.cli import fail, format_validation_error
from pipelines.inference import LoadedModel, load_model
from sd_detr.data.config import LoaderConfig
from sd_detr.data.dataset import build_dataloader
from sd_detr.data.meta import load_meta
from sd_detr.engine import predict
from sd_detr.evaluation import CocoEvaluator, coco_from_dict


class EvaluateConfig(BaseModel):
    """Options of `pipelines/evaluate.py`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="models:/<name>@<alias>, models:/<name>/<version> or a checkpoint directory.")
    data: Path = Field(description="Shard directory (with _meta.json) to evaluate on.")
    batch_size: int = Field(8, gt=0, description="Images per forward pass.")
    out: Path | None = Field(None, description="Write the statistics as JSON here.")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI).")


def evaluate_model(loaded: LoadedModel, data: Path, batch_size: int = 8) -> dict[str, float]:
    """The 12 COCO statistics of ``loaded`` on the shard directory ``data``."""
    meta = load_meta(data)
    if meta.category_ids.tolist() != loaded.category_ids:
        raise ValueError(
            f"the model's categories {loaded.category_ids} differ from {data}'s {meta.category_ids.tolist()}"
        )
    ground_truth = coco_from_dict(json.loads(meta.annotation_path(data).read_text()))
    evaluator = CocoEvaluator(ground_truth)
    loader = build_dataloader(
        data, loaded.augmentation, LoaderConfig(batch_size=batch_size, shuffle="none"), train=False
    )
    label_to_category_id = torch.tensor(loaded.category_ids)
    for batch in loader:
        if not len(batch):
            continue
        orig_sizes = torch.stack([t["orig_size"] for t in batch.targets])
        detections = predict(loaded.model, batch.images, batch.padding_mask, orig_sizes, label_to_category_id)
        evaluator.update([int(t["image_id"]) for t in batch.targets], detections)
    return evaluator.summarize()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out")
    parser.add_argument("--tracking-uri")
    args = parser.parse_args(argv)
    try:
        cfg = EvaluateConfig.model_validate({k: v for k, v in vars(args).items() if v is not None})
    except ValidationError as error:
        fail(format_validation_error(error))
    try:
        stats = evaluate_model(load_model(cfg.model, cfg.tracking_uri), cfg.data, cfg.batch_size)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
    for name, value in stats.items():
        print(f"{name:>6}: {value:.4f}")
    if cfg.out is not None:
        cfg.out.write_text(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
