"""The schedule estimate that ``benchmarks/step_speed.py --scope full`` prints (images/s, COCO hours)."""

from __future__ import annotations

import math

import pytest

from tests.pipeline_helpers import load_benchmark

throughput = load_benchmark("throughput")


def test_images_per_second_is_batch_over_step_time() -> None:
    assert throughput.images_per_second(2, 0.25) == pytest.approx(8.0)
    with pytest.raises(ValueError, match="positive"):
        throughput.images_per_second(2, 0.0)


def test_schedule_estimate_of_fifty_coco_epochs_on_eight_gpus() -> None:
    # 8 GPUs at 20 images/s each: 160 images/s; 50 x 118287 images / 160 = 36965 s = 10.27 h
    estimate = throughput.schedule_estimate(20.0)
    assert (estimate.gpus, estimate.epochs, estimate.epoch_images) == (8, 50, 118_287)
    assert estimate.hours == pytest.approx(50 * 118_287 / 160 / 3600)
    assert math.isclose(estimate.hours, 10.268, rel_tol=1e-3)
    # twice the GPUs (or twice the rate) halves it
    assert throughput.schedule_estimate(20.0, gpus=16).hours == pytest.approx(estimate.hours / 2)
    assert throughput.schedule_estimate(40.0).hours == pytest.approx(estimate.hours / 2)


@pytest.mark.parametrize(
    "kwargs", [{"images_per_s": 0.0}, {"images_per_s": 5.0, "gpus": 0}, {"images_per_s": 5.0, "epochs": 0}]
)
def test_schedule_estimate_rejects_impossible_inputs(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="positive"):
        throughput.schedule_estimate(**kwargs)
