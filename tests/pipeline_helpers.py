"""A tiny training job config for pipeline tests (seconds per epoch on 2 CPUs)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from pipelines.config import TrainJobConfig
from sd_detr.config import load_config

REPO = Path(__file__).resolve().parents[1]

TINY_OVERRIDES = [
    "model.num_queries=10",
    "model.backbone.name=resnet18",
    "model.backbone.feature_level=c4",
    "model.transformer.d_model=32",
    "model.transformer.num_heads=4",
    "model.transformer.ffn_dim=64",
    "model.transformer.num_encoder_layers=1",
    "model.transformer.num_decoder_layers=2",
    "data.loader.batch_size=2",
    "data.loader.decode_batch_size=4",
    "data.augmentation.train_scales=[128]",
    "data.augmentation.eval_size=128",
    "training.num_prediction_images=2",
    "training.log_every_steps=2",
]


def tiny_job_overrides(tmp_path: Path, synthetic_root: Path, run_name: str, epochs: int = 2) -> list[str]:
    """Overrides of configs/default.yaml for a tiny 2-worker run writing under ``tmp_path``."""
    return [
        *TINY_OVERRIDES,
        f"optimizer.epochs={epochs}",
        f"data.train_dir={synthetic_root / 'train'}",
        f"data.val_dir={synthetic_root / 'val'}",
        f"training.run_name={run_name}",
        f"training.storage_path={tmp_path / 'ray_results'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"tracking.artifact_root={tmp_path / 'mlartifacts'}",
        f"tracking.model_name=tiny-{run_name}",
    ]


def tiny_job_config(tmp_path: Path, synthetic_root: Path, run_name: str, epochs: int = 2, extra: list[str] = ()):
    """The validated :class:`TrainJobConfig` of :func:`tiny_job_overrides` plus ``extra`` overrides."""
    overrides = [*tiny_job_overrides(tmp_path, synthetic_root, run_name, epochs), *extra]
    return load_config(TrainJobConfig, REPO / "configs" / "default.yaml", overrides)


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as module ``name`` (the benchmarks folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
