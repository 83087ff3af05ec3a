"""MLflow logging that survives tracking outages: a durable outbox of metric batches and artifact folders.

Rank 0 of the training loop (and the driver at the end of a job) logs through :class:`TrackingOutbox`:

* every metric batch is first appended to ``unlogged_metrics.jsonl`` in the run's storage folder (beside its
  checkpoints), with the timestamp it will be logged under, then sent with a short, bounded retry;
* artifact folders (an epoch's plots and prediction images) are staged under ``unlogged_artifacts/`` and
  uploaded the same way;
* what was sent is removed from the outbox; what was not stays there and is sent again at the next
  :meth:`TrackingOutbox.flush` (the next epoch, the end of the job, or `pipelines/register.py`).

Re-sending is idempotent: a metric keeps its original timestamp, and MLflow's SQL store drops a metric whose
(key, step, timestamp, value) it already holds, so a batch whose reply was lost in an outage is stored once.
Artifacts are re-uploaded to the same paths (overwritten).

The storage folder may be a local/NFS path or a URI that ``pyarrow.fs`` understands (``s3://...``).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyarrow.fs as pafs
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

OUTBOX_FILENAME = "unlogged_metrics.jsonl"
"""Metric batches not (yet) logged to MLflow, one JSON object per line, in the run's storage folder."""
ARTIFACTS_DIRNAME = "unlogged_artifacts"
"""Artifact folders not (yet) uploaded, ``<ARTIFACTS_DIRNAME>/<artifact path>/...`` in the run's storage."""

RETRY_DELAYS_S = (1.0, 3.0)
"""Pauses between the attempts of one tracking call (three attempts in all, a few seconds when the server
is down; the HTTP timeout per attempt is ``MLFLOW_HTTP_REQUEST_TIMEOUT``, see :func:`bound_http_retries`)."""

T = TypeVar("T")


def bound_http_retries(timeout_s: int = 10) -> None:
    """Make MLflow's HTTP client give up quickly in this process (it retries for minutes by default): no
    retries of its own (:func:`call_with_retries` retries instead) and ``timeout_s`` per request. Values the
    user set in the environment are kept."""
    import os

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(timeout_s)))


def registered_checkpoint_epoch(storage: RunStorage) -> int:
    """The newest epoch whose checkpoint Ray Train's controller has registered (its checkpoint-manager
    snapshot in the run's storage lists the kept checkpoints with their metrics); -1 when none."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    try:
        results = json.loads(storage.read_text(CHECKPOINT_MANAGER_SNAPSHOT_FILENAME) or "{}").get("checkpoint_results")
    except (OSError, ValueError):
        return -1
    epochs = [r.get("metrics", {}).get("epoch") for r in results or []]
    return max((int(e) for e in epochs if isinstance(e, (int, float))), default=-1)


def call_with_retries(call: Callable[[], T], what: str, delays_s: tuple[float, ...] = RETRY_DELAYS_S) -> T:
    """``call()``, retried after each of ``delays_s`` (seconds) when it raises; the last error propagates."""
    for attempt, delay in enumerate((*delays_s, None)):
        try:
            return call()
        except Exception as error:  # transport errors, 5xx, timeouts: all mean "not logged now"
            if delay is None:
                raise
            logger.debug("%s failed (attempt %d): %s; retrying in %.0fs", what, attempt + 1, error, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


class RunStorage:
    """The run's storage folder ``<storage_path>/<run_name>`` (local path or ``pyarrow.fs`` URI)."""

    def __init__(self, storage_path: str, run_name: str) -> None:
        self.filesystem, root = pafs.FileSystem.from_uri(storage_path)
        self.path = f"{root.rstrip('/')}/{run_name}"
        self.uri = f"{storage_path.rstrip('/')}/{run_name}"

    def full(self, relative: str) -> str:
        """The filesystem path of ``relative`` (``""``: the run folder itself)."""
        return f"{self.path}/{relative}" if relative else self.path

    def exists(self, relative: str) -> bool:
        return self.filesystem.get_file_info(self.full(relative)).type != pafs.FileType.NotFound

    def read_text(self, relative: str) -> str | None:
        """The file's text, or None when it does not exist."""
        if not self.exists(relative):
            return None
        with self.filesystem.open_input_stream(self.full(relative)) as stream:
            return stream.read().decode()

    def write_text(self, relative: str, text: str) -> None:
        """Write ``text`` (via a temporary name then a move, so a reader never sees half a file)."""
        target = self.full(relative)
        self.filesystem.create_dir(target.rsplit("/", 1)[0], recursive=True)
        partial = f"{target}.partial"
        with self.filesystem.open_output_stream(partial) as stream:
            stream.write(text.encode())
        self.filesystem.move(partial, target)

    def delete(self, relative: str) -> None:
        info = self.filesystem.get_file_info(self.full(relative))
        if info.type == pafs.FileType.Directory:
            self.filesystem.delete_dir(info.path)
        elif info.type == pafs.FileType.File:
            self.filesystem.delete_file(info.path)

    def copy_in(self, local_dir: Path, relative: str) -> None:
        """Copy the local folder ``local_dir`` to ``relative`` (replacing what was there)."""
        self.delete(relative)
        self.filesystem.create_dir(self.full(relative), recursive=True)
        pafs.copy_files(str(local_dir), self.full(relative), destination_filesystem=self.filesystem)

    @contextmanager
    def local_copy(self, relative: str) -> Iterator[Path]:
        """The folder ``relative`` as a local folder (itself when local, else a temporary download)."""
        if isinstance(self.filesystem, pafs.LocalFileSystem):
            yield Path(self.path) / relative
            return
        with tempfile.TemporaryDirectory(prefix="sd-detr-outbox-") as directory:
            pafs.copy_files(self.full(relative), directory, source_filesystem=self.filesystem)
            yield Path(directory)

    def subfolders(self, relative: str) -> list[str]:
        """Names of the folders directly under ``relative`` (empty when it does not exist)."""
        if not self.exists(relative):
            return []
        infos = self.filesystem.get_file_info(pafs.FileSelector(self.full(relative)))
        return sorted(Path(i.path).name for i in infos if i.type == pafs.FileType.Directory)


@dataclass
class PendingBatch:
    """One metric batch: ``metrics`` (name -> value) logged at ``step`` with ``timestamp_ms``; ``epoch`` is the
    training epoch it describes (None for bookkeeping such as ``resumed_from_epoch``)."""

    step: int
    timestamp_ms: int
    metrics: dict[str, float]
    epoch: int | None = None

    def entities(self) -> list[Metric]:
        return [Metric(k, float(v), self.timestamp_ms, self.step) for k, v in self.metrics.items()]

    def to_json(self) -> str:
        values = {k: (None if math.isnan(v) else v) for k, v in self.metrics.items()}  # JSON has no NaN
        return json.dumps(
            {"step": self.step, "timestamp_ms": self.timestamp_ms, "epoch": self.epoch, "metrics": values}
        )

    @classmethod
    def from_json(cls, line: str) -> PendingBatch:
        data = json.loads(line)
        metrics = {k: (math.nan if v is None else float(v)) for k, v in data["metrics"].items()}
        return cls(int(data["step"]), int(data["timestamp_ms"]), metrics, data.get("epoch"))


@dataclass
class TrackingOutbox:
    """Metric batches and artifact folders bound for MLflow run ``run_id``, kept in ``storage`` until sent.

    ``client`` may be None (no tracking): then nothing is recorded at all.
    """

    client: MlflowClient | None
    run_id: str | None
    storage: RunStorage
    pending: list[PendingBatch] = field(default_factory=list)
    last_error: str | None = None

    @classmethod
    def open(cls, client: MlflowClient | None, run_id: str | None, storage: RunStorage) -> TrackingOutbox:
        """The outbox of ``storage``, with whatever an earlier process left unsent in it."""
        outbox = cls(client, run_id, storage)
        text = storage.read_text(OUTBOX_FILENAME) or ""
        header, *lines = text.splitlines() or [""]
        if header:
            saved = json.loads(header).get("run_id")
            if run_id is not None and saved not in (None, run_id):
                logger.warning("%s/%s belongs to MLflow run %s, not %s: ignored", storage.uri, OUTBOX_FILENAME,
                               saved, run_id)  # fmt: skip
                lines = []
            outbox.run_id = run_id or saved
        outbox.pending = [PendingBatch.from_json(line) for line in lines if line.strip()]
        return outbox

    @property
    def enabled(self) -> bool:
        return self.client is not None and self.run_id is not None

    def _save(self) -> None:
        if not self.pending:
            self.storage.delete(OUTBOX_FILENAME)
            return
        header = json.dumps({"run_id": self.run_id})
        self.storage.write_text(OUTBOX_FILENAME, "\n".join([header, *(b.to_json() for b in self.pending)]) + "\n")

    def drop_epochs_from(self, epoch: int) -> None:
        """Forget unsent batches of epochs >= ``epoch``: a resumed run trains them again (and logs them anew)."""
        for name in self.unsent_artifacts():
            if name.startswith("epoch") and int(name[5:]) >= epoch:
                self.storage.delete(f"{ARTIFACTS_DIRNAME}/{name}")
        kept = [b for b in self.pending if b.epoch is None or b.epoch < epoch]
        if len(kept) != len(self.pending):
            logger.info("outbox: %d unsent batch(es) of epochs >= %d dropped (retrained)", len(self.pending) - len(kept),
                        epoch)  # fmt: skip
            self.pending = kept
            self._save()

    def add_metrics(self, metrics: dict[str, Any], step: int, epoch: int | None = None) -> None:
        """Record numeric ``metrics`` at ``step`` durably (sent by the next :meth:`flush`)."""
        if not self.enabled:
            return
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numeric:
            self.pending.append(PendingBatch(step, int(time.time() * 1000), numeric, epoch))
            self._save()

    def add_artifacts(self, local_dir: Path, bundle: str) -> None:
        """Stage the files of ``local_dir`` as ``bundle`` (a folder name without '/'); they are uploaded to the
        run's artifact root, keeping their relative paths (``plots/x.png`` stays ``plots/x.png``)."""
        if self.enabled and any(Path(local_dir).iterdir()):
            self.storage.copy_in(Path(local_dir), f"{ARTIFACTS_DIRNAME}/{bundle}")

    def unsent_artifacts(self) -> list[str]:
        return self.storage.subfolders(ARTIFACTS_DIRNAME)

    def flush(self, delays_s: tuple[float, ...] = RETRY_DELAYS_S, durable_through: int | None = None) -> bool:
        """Send what is pending, oldest first, each call retried after ``delays_s``; stop at the first call
        that still fails (the rest stays in the outbox). Returns whether the outbox is now empty.

        ``durable_through``: when given, batches of later epochs wait (their checkpoint is not registered
        yet: a worker group that died now would train those epochs again, and they would be logged twice).
        """
        if not self.enabled:
            return True
        try:
            while self.pending:
                batch = self.pending[0]
                if durable_through is not None and batch.epoch is not None and batch.epoch > durable_through:
                    return False
                entities = batch.entities()
                for start in range(0, len(entities), 1000):  # MLflow's limit per log_batch
                    chunk = entities[start : start + 1000]
                    call_with_retries(lambda c=chunk: self.client.log_batch(self.run_id, metrics=c),
                                      f"log_batch step {batch.step}", delays_s)  # fmt: skip
                self.pending.pop(0)
                self._save()
            for name in self.unsent_artifacts():
                if durable_through is not None and name.startswith("epoch") and int(name[5:]) > durable_through:
                    continue
                with self.storage.local_copy(f"{ARTIFACTS_DIRNAME}/{name}") as folder:
                    call_with_retries(lambda f=folder: self.client.log_artifacts(self.run_id, str(f)),
                                      f"log_artifacts {name}", delays_s)  # fmt: skip
                self.storage.delete(f"{ARTIFACTS_DIRNAME}/{name}")
            if not self.unsent_artifacts():
                self.storage.delete(ARTIFACTS_DIRNAME)
        except Exception as error:
            self.last_error = f"{type(error).__name__}: {str(error)[:200]}"
            logger.warning("MLflow unreachable (%s): %s kept in %s for later", self.last_error, self.describe(),
                           self.storage.uri)  # fmt: skip
            return False
        self.last_error = None
        return not self.pending and not self.unsent_artifacts()

    def describe(self) -> str:
        """What is unsent, in one line (e.g. "metrics of epochs 1, 2 (2 batches), artifacts epoch001")."""
        parts = []
        if self.pending:
            epochs = sorted({b.epoch for b in self.pending if b.epoch is not None})
            steps = sorted({b.step for b in self.pending if b.epoch is None})
            what = [f"epochs {', '.join(map(str, epochs))}"] if epochs else []
            what += [f"steps {', '.join(map(str, steps))} (bookkeeping)"] if steps else []
            parts.append(f"metrics of {' and '.join(what)} ({len(self.pending)} batch(es))")
        artifacts = self.unsent_artifacts()
        if artifacts:
            parts.append(f"artifacts {', '.join(artifacts)}")
        return "; ".join(parts) or "nothing"


class FolderArtifactClient:
    """A stand-in for ``MlflowClient.log_artifact`` that copies files into a local folder, so code written
    against the client (e.g. ``log_evaluation_artifacts``) can stage its artifacts for the outbox."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        del run_id
        target = self.folder / (artifact_path or "")
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(local_path, target / Path(local_path).name)
