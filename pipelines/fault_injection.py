"""Test hooks: `training.fault_injection` (kill one Ray Train worker process once, after a given epoch) and
`SD_DETR_WORKER_PROGRESS_DIR` (each worker records its pid and training progress, so a test can kill it
at a chosen point inside an epoch)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

from pipelines.config import TrainJobConfig

logger = logging.getLogger(__name__)


def maybe_inject_fault(cfg: TrainJobConfig, epoch: int, rank: int) -> None:
    """Exit this worker process (``os._exit(1)``, no cleanup) if ``cfg.training.fault_injection`` names this
    epoch and rank and it has not fired yet in this run (a marker file in the run's storage remembers it)."""
    injection = cfg.training.fault_injection
    if injection.kill_after_epoch != epoch or injection.rank != rank:
        return
    marker = Path(cfg.training.storage_path) / cfg.training.run_name / f"fault_injected_after_epoch_{epoch}"
    if marker.exists():
        return
    if epoch > 0:
        wait_until_checkpoint_registered(marker.parent / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME, epoch - 1)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("killed once by training.fault_injection\n")
    logger.warning("[fault injection] killing rank %d after epoch %d", rank, epoch)
    for handler in logging.getLogger("pipelines").handlers:
        handler.flush()
    os._exit(1)


def wait_until_checkpoint_registered(snapshot: Path, epoch: int, timeout_s: float = 120.0) -> None:
    """Block until Ray Train's controller has registered the checkpoint reported for ``epoch``.

    Ray Train V2 queues a report in the worker until the controller polls it (every ~2 s); a worker that
    dies before that poll loses the report, and the restart resumes from the checkpoint before. The fault
    hook waits for the controller's checkpoint snapshot (``checkpoint_manager_snapshot.json`` in the run's
    storage) to list that epoch, so "killed after epoch k" always resumes from epoch k-1's checkpoint.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            results = json.loads(snapshot.read_text()).get("checkpoint_results", [])
        except (OSError, ValueError):
            results = []
        if any(r.get("metrics", {}).get("epoch") == float(epoch) for r in results):
            return
        time.sleep(0.2)


PROGRESS_DIR_ENV = "SD_DETR_WORKER_PROGRESS_DIR"
"""Test hook: when set (to a local folder), every worker writes ``rank<R>.json`` there after each step."""


class ProgressRecorder:
    """Writes ``{"pid", "rank", "epoch", "step", "time"}`` of this worker to ``<folder>/rank<R>.json`` after every
    training step (replacing the file atomically), so a test can pick a worker's pid and a moment inside an
    epoch to kill it at. Off unless :data:`PROGRESS_DIR_ENV` is set."""

    def __init__(self, folder: Path, rank: int) -> None:
        self.folder = folder
        self.rank = rank
        folder.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_environment(cls, rank: int) -> ProgressRecorder | None:
        folder = os.environ.get(PROGRESS_DIR_ENV)
        return cls(Path(folder), rank) if folder else None

    def step_done(self, epoch: int, step: int) -> None:
        """Record that ``step`` (1-based) of ``epoch`` has finished on this rank."""
        record = {"pid": os.getpid(), "rank": self.rank, "epoch": epoch, "step": step, "time": time.time()}
        path = self.folder / f"rank{self.rank}.json"
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(record))
        partial.replace(path)
