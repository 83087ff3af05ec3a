"""Driver-side guards of a training run name, checked before Ray starts.

* :func:`check_resume_compatible`: rerunning ``training.run_name`` resumes its latest checkpoint, which is only
  safe when the checkpoint was made with the same model and optimisation setup, and only means something when
  ``optimizer.epochs`` is at least the epochs it has trained. Otherwise the job stops
  (:class:`IncompatibleCheckpointError`, exit code 2 in `pipelines/train.py`) naming the differing fields or the
  epochs. A rerun with exactly the trained epochs trains nothing and only finishes the run (logs what is unsent,
  registers its best checkpoint unless that checkpoint is registered already).
* :func:`check_sweep_settings`: a resumed sweep keeps the settings that define its trials, as its Tune storage
  recorded them (:func:`record_sweep_settings`), whatever MLflow experiment it now logs to.
* :func:`job_lock`: one job per (storage path, run name) at a time, and :func:`sweep_lock`, one sweep driver
  per (storage, sweep name), through :func:`sd_detr.data.lock.exclusive_lock` (a kernel ``flock``: a crashed
  job never leaves it stuck).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from pipelines.checkpoint import CONFIG_FILE, METRICS_FILE, checkpoint_config_json
from pipelines.config import TrainJobConfig
from pipelines.metrics_outbox import RunStorage
from sd_detr.config import flatten_config, with_saved_config_defaults
from sd_detr.data.lock import exclusive_lock

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint_"
"""Ray Train's checkpoint folder names inside the run's storage folder (``checkpoint_<timestamp>``)."""

COMPATIBILITY_PREFIXES = ("model.", "matcher.", "loss.", "optimizer.")
"""Config fields a resumed checkpoint must agree on: the network (shapes, variant), the objective and the
optimiser/scheduler (whose states the checkpoint holds) ..."""
COMPATIBILITY_FIELDS = ("data.train_dir", "data.val_dir")
"""... and the data it was trained and evaluated on."""
RESUMABLE_FIELDS = ("optimizer.epochs", "model.backbone.weights_path")
"""Fields that may change on resume: more epochs extend a run; the backbone's initial weights file only
matters before the first checkpoint (and its path differs between machines)."""


class IncompatibleCheckpointError(ValueError):
    """The run name's checkpoint was made with a config that differs in fields that must match."""


def compatibility_differences(old: dict[str, str], new: dict[str, str]) -> list[tuple[str, str, str]]:
    """(field, checkpoint value, new value) of every compatibility field that differs between two flattened
    configs (a field missing on one side shows as ``<absent>``), sorted by field."""
    keys = {k for k in old.keys() | new.keys() if k.startswith(COMPATIBILITY_PREFIXES) or k in COMPATIBILITY_FIELDS}
    return [
        (key, old.get(key, "<absent>"), new.get(key, "<absent>"))
        for key in sorted(keys - set(RESUMABLE_FIELDS))
        if old.get(key) != new.get(key)
    ]


def latest_checkpoint(storage: RunStorage) -> str | None:
    """The newest ``checkpoint_*`` folder name in the run's storage folder (Ray names them by time), or None."""
    names = [name for name in storage.subfolders("") if name.startswith(CHECKPOINT_PREFIX)]
    return max(names) if names else None


def checkpoint_config(storage: RunStorage, checkpoint: str) -> dict:
    """The job config (JSON) a checkpoint of ``storage`` was made with (fields it predates at the values it was
    made with: :func:`sd_detr.config.with_saved_config_defaults`)."""
    text = storage.read_text(f"{checkpoint}/{CONFIG_FILE}")
    if text is not None:
        return with_saved_config_defaults(json.loads(text))
    with storage.local_copy(checkpoint) as directory:  # a checkpoint written before config.json existed
        return checkpoint_config_json(directory)


def trained_epochs(storage: RunStorage, checkpoint: str) -> int | None:
    """How many epochs the run had trained when ``checkpoint`` was made (its ``metrics.json`` epoch + 1), or
    None when the checkpoint predates that field."""
    text = storage.read_text(f"{checkpoint}/{METRICS_FILE}")
    epoch = json.loads(text).get("epoch") if text is not None else None
    return None if epoch is None else int(epoch) + 1


def check_resume_compatible(cfg: TrainJobConfig) -> None:
    """Raise :class:`IncompatibleCheckpointError` when ``cfg`` (absolute paths, data resolved) would resume a
    checkpoint of its run name that was made with different compatibility fields, or that has trained more
    epochs than ``cfg.optimizer.epochs``."""
    storage = RunStorage(cfg.training.storage_path, cfg.training.run_name)
    checkpoint = latest_checkpoint(storage)
    if checkpoint is None:
        return
    previous = TrainJobConfig.model_validate(checkpoint_config(storage, checkpoint))
    differences = compatibility_differences(flatten_config(previous), flatten_config(cfg))
    if not differences:
        check_epochs_left(cfg, storage, checkpoint)
        return
    shown = "\n".join(f"  {key}: checkpoint {old!r}, now {new!r}" for key, old, new in differences[:20])
    more = f"\n  ... and {len(differences) - 20} more" if len(differences) > 20 else ""
    raise IncompatibleCheckpointError(
        f"training.run_name={cfg.training.run_name!r} would resume {storage.uri}/{checkpoint}, which was made with "
        f"a different config:\n{shown}{more}\n"
        "To start fresh, choose a new name (--set training.run_name=NEW_NAME) or delete the run's storage folder "
        f"({storage.uri}); to resume, use the checkpoint's settings."
    )


def check_epochs_left(cfg: TrainJobConfig, storage: RunStorage, checkpoint: str) -> None:
    """Raise :class:`IncompatibleCheckpointError` when the run has trained more epochs than
    ``cfg.optimizer.epochs`` (the job would train nothing and report the longer run as this one); log that
    nothing is left to train when it has trained exactly that many."""
    done = trained_epochs(storage, checkpoint)
    if done is None or done < cfg.optimizer.epochs:
        return
    if done == cfg.optimizer.epochs:
        logger.info("run %r has trained all its %d epochs (%s/%s): nothing to train; the job only finishes its "
                    "MLflow run", cfg.training.run_name, done, storage.uri, checkpoint)  # fmt: skip
        return
    raise IncompatibleCheckpointError(
        f"training.run_name={cfg.training.run_name!r} has already trained {done} epochs ({storage.uri}/"
        f"{checkpoint}); optimizer.epochs={cfg.optimizer.epochs} asks for fewer.\n"
        "For a shorter run, choose a new name (--set training.run_name=NEW_NAME) or delete the run's storage "
        f"folder ({storage.uri}); to extend this run, set optimizer.epochs above {done}."
    )


SWEEP_SETTINGS_FILE = "sd_detr_sweep_settings.json"
"""The fixed settings of a sweep, in its Tune experiment folder (``<storage>/<sweep name>/``)."""


def changed_settings(
    old: dict[str, str], new: dict[str, str], fixed_prefixes: tuple[str, ...], exempt: Collection[str]
) -> list[str]:
    """Sorted flattened keys starting with one of ``fixed_prefixes`` (and not in ``exempt``) whose values differ
    between two flattened configs (a key on one side only differs)."""
    return sorted(
        key
        for key in old.keys() | new.keys()
        if key.startswith(fixed_prefixes) and key not in exempt and old.get(key) != new.get(key)
    )


def check_sweep_settings(
    storage: str, sweep_name: str, params: dict[str, str], fixed_prefixes: tuple[str, ...], searched: Collection[str]
) -> None:
    """Raise ``ValueError`` when the sweep's storage recorded other values of its fixed settings than
    ``params`` (the flattened sweep config): its saved Tune state would resume trials under a mixed config.
    Nothing recorded (a new sweep, or one started before this record existed): no check."""
    text = RunStorage(storage, sweep_name).read_text(SWEEP_SETTINGS_FILE)
    if text is None:
        return
    recorded = json.loads(text)
    changed = changed_settings(recorded, params, fixed_prefixes, searched)
    if changed:
        shown = ", ".join(f"{key} ({recorded.get(key, '<absent>')!r} -> {params.get(key, '<absent>')!r})"
                          for key in changed[:10])  # fmt: skip
        raise ValueError(
            f"sweep {sweep_name!r} in {storage} was started with other settings: {shown}"
            f"{f' and {len(changed) - 10} more' if len(changed) > 10 else ''}; rerun it with its original config "
            "or choose a new sweep.name"
        )


def record_sweep_settings(
    storage: str, sweep_name: str, params: dict[str, str], fixed_prefixes: tuple[str, ...]
) -> None:
    """Write the fixed settings of a sweep that starts afresh into its Tune experiment folder."""
    fixed = {key: value for key, value in params.items() if key.startswith(fixed_prefixes)}
    RunStorage(storage, sweep_name).write_text(SWEEP_SETTINGS_FILE, json.dumps(fixed, indent=1, sort_keys=True) + "\n")


def lock_path(storage: str, name: str) -> Path:
    """``<storage>/<name>.lock`` for a local storage path; for a URI (s3://...), a file in the local temp folder
    named after the URI (then it only keeps out jobs started on this machine)."""
    if "://" not in storage:
        Path(storage).mkdir(parents=True, exist_ok=True)
        return Path(storage) / f"{name}.lock"
    key = hashlib.sha256(f"{storage.rstrip('/')}/{name}".encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "sd-detr-job-locks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}-{key}.lock"


def job_lock_path(cfg: TrainJobConfig) -> Path:
    """The lock file of ``cfg``'s (storage path, run name): :func:`lock_path`."""
    return lock_path(cfg.training.storage_path, cfg.training.run_name)


@contextmanager
def job_lock(cfg: TrainJobConfig) -> Iterator[Path]:
    """Hold the lock of ``cfg``'s (storage path, run name) for the block (absolute storage path expected).

    Raises:
        LockHeldError: another job holds it (its message names the holder's pid, host and start time).
    """
    purpose = f"training job {cfg.training.run_name!r} in {cfg.training.storage_path}"
    with exclusive_lock(job_lock_path(cfg), purpose) as path:
        yield path


@contextmanager
def sweep_lock(storage: str, sweep_name: str) -> Iterator[Path]:
    """Hold the lock of a sweep (``<storage>/<sweep_name>.lock``, its Tune storage) for the block: one sweep
    driver per name, as :func:`job_lock` is one training job per run name.

    Raises:
        LockHeldError: another sweep driver holds it.
    """
    with exclusive_lock(lock_path(storage, sweep_name), f"sweep {sweep_name!r} in {storage}") as path:
        yield path
