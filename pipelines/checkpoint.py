"""The training checkpoint: one ``state.pt`` of tensors and plain values, written by rank 0 and read back
with ``torch.load(weights_only=True)`` only (no pickled objects on any load path), plus two small JSON files
that can be read without loading the weights: ``config.json`` (the job config) and ``metrics.json`` (the
epoch's metrics, e.g. ``val_AP``; used by `pipelines/register.py`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.config import TrainJobConfig
from sd_detr.config import with_saved_config_defaults
from sd_detr.model import Detector

CHECKPOINT_FILE = "state.pt"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues: the next epoch and the best val AP so far (with its epoch)."""

    start_epoch: int
    best_ap: float
    best_epoch: int


def load_checkpoint_state(directory: str | Path) -> dict[str, Any]:
    """The training state saved in a checkpoint directory (``torch.load(weights_only=True)``, on CPU).

    Raises:
        FileNotFoundError: ``directory`` holds no ``state.pt`` (not a checkpoint of `pipelines/train.py`).
    """
    path = Path(directory) / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a training checkpoint: {CHECKPOINT_FILE} not found in it")
    return torch.load(path, map_location="cpu", weights_only=True)


def training_state(
    model: Detector,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    epoch: int,
    best_ap: float,
    best_epoch: int,
    cfg: TrainJobConfig,
) -> dict[str, Any]:
    """Everything a resumed run needs after ``epoch``: weights, optimizer, scheduler and scaler states, the
    best val AP so far and the job config (as JSON text, so the state loads with ``weights_only=True``)."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "epoch": epoch,
        "best_ap": best_ap,
        "best_epoch": best_epoch,
        "config": json.dumps(cfg.model_dump(mode="json")),
    }


def save_checkpoint_state(directory: str | Path, state: dict[str, Any], metrics: dict[str, Any] | None = None) -> Path:
    """Write ``state`` (see :func:`training_state`) as ``<directory>/state.pt``, its config as ``config.json``
    and the numeric ``metrics`` as ``metrics.json``; returns the ``state.pt`` file."""
    path = Path(directory) / CHECKPOINT_FILE
    torch.save(state, path)
    (Path(directory) / CONFIG_FILE).write_text(state["config"])
    numeric = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
    (Path(directory) / METRICS_FILE).write_text(json.dumps(numeric, allow_nan=True))
    return path


def checkpoint_config_json(directory: str | Path) -> dict[str, Any]:
    """The job config a checkpoint was made with (``config.json``, or the copy inside ``state.pt`` of a
    checkpoint that predates that file), with the fields it predates at the values it was made with
    (:func:`sd_detr.config.with_saved_config_defaults`).

    Raises:
        FileNotFoundError: ``directory`` is not a training checkpoint.
    """
    path = Path(directory) / CONFIG_FILE
    text = path.read_text() if path.is_file() else load_checkpoint_state(directory)["config"]
    return with_saved_config_defaults(json.loads(text))


def checkpoint_metrics(directory: str | Path) -> dict[str, float]:
    """The metrics of the epoch a checkpoint was made after (``metrics.json``; ``{}`` when absent)."""
    path = Path(directory) / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def restore_training_state(
    state: dict[str, Any],
    model: Detector,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
) -> ResumePoint:
    """Load a :func:`training_state` into the (unwrapped) model, optimizer, scheduler and scaler."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return ResumePoint(int(state["epoch"]) + 1, float(state["best_ap"]), int(state["best_epoch"]))
