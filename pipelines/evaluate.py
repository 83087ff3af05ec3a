"""COCO AP of a trained model on a shard dataset.

    python pipelines/evaluate.py --model models:/sd-detr-synthetic@champion --data data/synthetic/val
    python pipelines/evaluate.py --model ray_results/sd-detr-synthetic/checkpoint_... --data DIR --out stats.json

The ground truth is the cleaned annotations stored beside the shards (`_ground_truth.json`), never the source
json. Detections are scored by the same code as training-time evaluation (`pipelines.distributed_eval`, here
as a single rank), so the same weights give the same AP here, at any `--batch-size`, and during training.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.cli import fail, format_validation_error
from pipelines.distributed_eval import Evaluation, evaluate, ground_truth_coco
from pipelines.inference import LoadedModel, load_model
from sd_detr.data.config import LoaderConfig
from sd_detr.data.dataset import build_dataloader
from sd_detr.data.meta import load_meta


class EvaluateConfig(BaseModel):
    """Options of `pipelines/evaluate.py`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="models:/<name>@<alias>, models:/<name>/<version> or a checkpoint directory.")
    data: Path = Field(description="Shard directory (with _meta.json) to evaluate on.")
    batch_size: int = Field(8, gt=0, description="Images per forward pass.")
    out: Path | None = Field(None, description="Write the statistics as JSON here.")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI).")


def evaluate_shards(loaded: LoadedModel, data: Path, batch_size: int = 8) -> Evaluation:
    """The evaluation (COCO statistics and score-IoU diagnostics) of ``loaded`` on the shard directory ``data``
    (CPU, one process, the code of training-time evaluation)."""
    meta = load_meta(data)
    if meta.category_ids.tolist() != loaded.category_ids:
        raise ValueError(
            f"the model's categories {loaded.category_ids} differ from {data}'s {meta.category_ids.tolist()}"
        )
    ground_truth = ground_truth_coco(data)
    loader = build_dataloader(
        data, loaded.augmentation, LoaderConfig(batch_size=batch_size, shuffle="none"), train=False
    )
    label_to_category_id = torch.tensor(loaded.category_ids, dtype=torch.int64)
    return evaluate(loaded.model, loader, ground_truth, label_to_category_id, torch.device("cpu"), None)


def evaluate_model(loaded: LoadedModel, data: Path, batch_size: int = 8) -> dict[str, float]:
    """The 12 COCO statistics of ``loaded`` on the shard directory ``data``."""
    return evaluate_shards(loaded, data, batch_size).coco_stats()


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
