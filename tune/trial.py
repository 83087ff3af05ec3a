"""One Tune trial: a function trainable that builds and fits the very TorchTrainer of `pipelines/train.py`
(`pipelines.training.prepare_run` + `build_trainer`), its MLflow run nested under the sweep's parent run.

Inside the trial only ``ray.tune.get_context`` is used (``ray.train.*`` raises in a Tune session); metrics
reach Tune through :class:`EpochReportCallback`, one Tune result per Train epoch report.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from pipelines.cli import configure_logging
from pipelines.config import TrainJobConfig
from pipelines.run_outcome import finish_run, fit_or_fail
from pipelines.run_setup import prepare_run
from pipelines.tags import TRIAL_ID_TAG
from pipelines.tracking import client_for
from pipelines.trainer import build_trainer
from tune.config import TIME_ATTR, SearchKey, build_trial_config, format_value

logger = logging.getLogger(__name__)


class EpochReportCallback(TuneReportCallback):
    """:class:`TuneReportCallback` that adds ``epochs_done`` (epochs completed, 1-based) to each result.

    ASHA needs a time attribute that survives a restart: Tune's ``training_iteration`` counts the reports of
    the current trial process, which starts again at 1 when a resumed Train run continues at a later epoch.
    """

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        rank_zero = {**metrics[0], TIME_ATTR: int(metrics[0]["epoch"]) + 1}
        super().after_report(run_context, [rank_zero, *metrics[1:]], checkpoint)


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a sweep shares (sent to the trial actors with ``tune.with_parameters``).

    ``job`` is the trials' base :class:`TrainJobConfig` as JSON data, with absolute paths and the dataset
    already resolved by the driver; ``search_keys`` name the trials' runs.
    """

    job: dict[str, Any]
    sweep_name: str
    parent_run_id: str
    search_keys: tuple[SearchKey, ...]


def trial_run_name(sweep_name: str, trial_id: str, params: dict[str, Any], keys: Sequence[SearchKey]) -> str:
    """Deterministic Ray Train and MLflow run name of a trial: sweep name, Tune trial id (kept by
    ``Tuner.restore``) and each searched value after its key's abbreviation, e.g. ``sweep-3f2a1_00002-w0.5-s1``
    (characters a run name cannot hold become ``_``)."""
    values = "".join(f"-{key.abbreviation}{format_value(params[key.path])}" for key in keys)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{sweep_name}-{trial_id}{values}")


def trial_job_config(job: dict[str, Any], params: dict[str, Any], run_name: str) -> TrainJobConfig:
    """The config a trial trains with: :func:`tune.config.build_trial_config`, registering nothing. The sweep
    registers its best trial's model at the end (`tune/sweep.py`), so the alias never moves to another trial."""
    cfg = build_trial_config(job, params, run_name)
    return cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"register_model": False})})


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """Tune function trainable: fit the trial's TorchTrainer, resuming its Train run and MLflow child run when
    they exist (a restored sweep), and close the child run when training ends.

    When ASHA stops the trial, Tune kills this actor during ``fit``; the driver closes that child run.
    """
    configure_logging()  # in the trial's actor: its stdout reaches the driver through Ray
    trial_id = ray.tune.get_context().get_trial_id()
    run_name = trial_run_name(setup.sweep_name, trial_id, params, setup.search_keys)
    cfg = trial_job_config(setup.job, params, run_name)
    prepared = prepare_run(cfg, run_name=run_name, parent_run_id=setup.parent_run_id)
    client_for(prepared.tracking_uri).set_tag(prepared.run_id, TRIAL_ID_TAG, trial_id)
    logger.info("[trial %s] %s -> MLflow run %s (%s)", trial_id, params, prepared.run_id, run_name)
    result = fit_or_fail(prepared, build_trainer(prepared, callbacks=[EpochReportCallback()]))
    finish_run(prepared, result)
