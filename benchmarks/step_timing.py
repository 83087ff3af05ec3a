"""Interleaved wall-clock timing of several models and the per-model result of one timed phase."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch


class Named(Protocol):
    """Anything timed: a model under test with a unique ``name``."""

    name: str


Candidate = TypeVar("Candidate", bound=Named)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    candidates: list[Candidate],
    run: Callable[[Candidate], None],
    repeats: int,
    warmup: int,
    device: torch.device,
) -> dict[str, list[float]]:
    """Seconds per call of ``run(candidate)`` for each repeat, by candidate name. Every repeat runs each
    candidate once, starting one candidate later each time, so a candidate never always follows the same one."""
    times: dict[str, list[float]] = {c.name: [] for c in candidates}
    for index in range(warmup + repeats):
        shift = index % len(candidates)
        for candidate in candidates[shift:] + candidates[:shift]:
            synchronize(device)
            start = time.perf_counter()
            run(candidate)
            synchronize(device)
            if index >= warmup:
                times[candidate.name].append(time.perf_counter() - start)
    return times


@dataclass
class PhaseResult:
    """One model in one phase (training step or inference): times [s], peak bytes, FLOPs."""

    seconds: list[float]
    peak_bytes: float
    flops: int

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)

    def paired_ratio(self, reference: PhaseResult) -> float:
        """Median over repeats of this time / the reference's time in the same repeat (noise that lasts
        longer than one repeat cancels)."""
        return statistics.median(t / r for t, r in zip(self.seconds, reference.seconds, strict=True))
