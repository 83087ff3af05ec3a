"""`training.ray_console`: what `quiet` drops of Ray's lines, and what it leaves alone."""

from __future__ import annotations

import io
import logging

from ray._private.log import PlainRayHandler

from pipelines.ray_console import apply_ray_console


def _record(level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord("ray.data", level, __file__, 1, message, None, None)


def test_quiet_filters_only_ray_datas_own_console_handler() -> None:
    ray_data = logging.getLogger("ray.data")
    own, foreign = PlainRayHandler(), logging.StreamHandler(io.StringIO())  # foreign: e.g. a test's capture
    ray_data.addHandler(own)
    ray_data.addHandler(foreign)
    routine = _record(logging.INFO, "Dataset train_3_0 execution finished in 2.05 seconds")
    try:
        apply_ray_console("quiet")
        assert not own.filter(routine) and own.filter(_record(logging.WARNING, "a block failed to decode"))
        assert not own.filter(_record(logging.WARNING, "Dataset val_1 execution finished in 0.4 seconds"))
        assert foreign.filter(routine) and foreign.filters == []
        apply_ray_console("verbose")
        assert own.filter(routine) and own.filters == []
    finally:
        apply_ray_console("verbose")
        ray_data.removeHandler(own)
        ray_data.removeHandler(foreign)
