"""Training images/s from a measured step time, and the wall time of a COCO schedule at that rate.

Used by ``step_speed.py`` to turn its GPU step times into the figures a cluster plan needs: images/s per GPU
and what the paper's 50 COCO epochs would take on 8 such GPUs (pure arithmetic, no measurement here).
"""

from __future__ import annotations

from dataclasses import dataclass

COCO_TRAIN_IMAGES = 118_287
"""Images in COCO train2017 (the split the paper trains on)."""


@dataclass(frozen=True)
class ScheduleEstimate:
    """A training schedule at a measured per-GPU rate: ``images_per_s`` per GPU, ``hours`` of wall time for
    ``epochs`` epochs of ``epoch_images`` images on ``gpus`` GPUs."""

    images_per_s: float
    gpus: int
    epochs: int
    epoch_images: int
    hours: float


def images_per_second(batch: int, step_seconds: float) -> float:
    """Training images/s of one device: ``batch`` images per step of ``step_seconds`` (> 0) seconds."""
    if step_seconds <= 0:
        raise ValueError(f"step time must be positive, got {step_seconds}")
    return batch / step_seconds


def schedule_estimate(
    images_per_s: float, gpus: int = 8, epochs: int = 50, epoch_images: int = COCO_TRAIN_IMAGES
) -> ScheduleEstimate:
    """Wall time of ``epochs`` x ``epoch_images`` images on ``gpus`` devices that each train ``images_per_s``
    images/s, with perfect data-parallel scaling and no time outside the steps (no data wait, evaluation,
    checkpoints or all-reduce): a lower bound of the real schedule."""
    if images_per_s <= 0 or gpus < 1 or epochs < 1 or epoch_images < 1:
        raise ValueError(
            f"need positive rate, gpus, epochs and images: {images_per_s}, {gpus}, {epochs}, {epoch_images}"
        )
    hours = epochs * epoch_images / (gpus * images_per_s) / 3600.0
    return ScheduleEstimate(images_per_s, gpus, epochs, epoch_images, hours)
