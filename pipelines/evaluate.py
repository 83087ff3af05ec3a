"""COCO AP of a trained model on a shard dataset.

    python pipelines/evaluate.py --model models:/sd-detr-synthetic@champion --data data/synthetic/val
    python pipelines/evaluate.py --model ray_results/sd-detr-synthetic/checkpoint_... --data DIR --out stats.json
    python pipelines/evaluate.py --config eval.yaml --set batch_size=16

Options are the fields of `EvaluateConfig`, read like `pipelines/train.py`'s: `--config FILE` (repeatable),
then the flags below (each sets the field of its name), then `--set field=value` overrides.

The ground truth is the cleaned annotations stored beside the shards (`_ground_truth.json`), never the source
json. Detections are scored by the same code as training-time evaluation (`pipelines.distributed_eval`, here
as a single rank), so the same weights give the same AP here, at any `--batch-size`, and during training.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from pipelines.cli import add_config_arguments, configure_logging, fail, flag_fields, load_or_exit
from pipelines.distributed_eval import Evaluation, evaluate, ground_truth_coco
from pipelines.inference import LoadedModel, load_model
from sd_detr.data.config import LoaderConfig
from sd_detr.data.dataset import build_dataloader
from sd_detr.data.meta import load_meta

logger = logging.getLogger("pipelines.evaluate")  # by name: run as a script, __name__ is "__main__"


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
    add_config_arguments(parser, None)
    parser.add_argument("--model", help="sets model (required here or in a config)")
    parser.add_argument("--data", help="sets data (required here or in a config)")
    parser.add_argument("--batch-size", type=int, help="sets batch_size (default 8)")
    parser.add_argument("--out", help="sets out")
    parser.add_argument("--tracking-uri", help="sets tracking_uri")
    args = parser.parse_args(argv)
    configure_logging()
    fields = flag_fields(args, [name for name in EvaluateConfig.model_fields if name in vars(args)])
    cfg = load_or_exit(EvaluateConfig, args.config, args.set, None, fields)
    try:
        stats = evaluate_model(load_model(cfg.model, cfg.tracking_uri), cfg.data, cfg.batch_size)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
    logger.info("\n".join(f"{name:>6}: {value:.4f}" for name, value in stats.items()))
    if cfg.out is not None:
        cfg.out.write_text(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
