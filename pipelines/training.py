"""A whole training job on the driver, shared by `pipelines/train.py` and the benchmarks: check, prepare the
run, fit the TorchTrainer on Ray and finish the run (each step in its own module)."""

from __future__ import annotations

import logging

from pipelines.config import TrainJobConfig
from pipelines.ray_cluster import check_cluster_fits, ensure_ray
from pipelines.run_guard import job_lock
from pipelines.run_outcome import TrainingOutcome, finish_run, fit_or_fail, trained_result
from pipelines.run_setup import check_backbone_init, prepare_run
from pipelines.tracking import run_url
from pipelines.trainer import build_trainer

logger = logging.getLogger(__name__)


def run_training(cfg: TrainJobConfig, callbacks: list | None = None) -> TrainingOutcome:
    """Validate, prepare, fit and register: the whole `pipelines/train.py` job. Logs the MLflow run's URL
    at INFO when the run is ready. A run whose every epoch is trained (and checkpointed) is only finished: what
    is unsent is logged and its best checkpoint registered, without starting Ray."""
    check_backbone_init(cfg)
    with job_lock(cfg.with_absolute_paths()):
        prepared = prepare_run(cfg)
        logger.info("MLflow run %s%s: %s", prepared.run_id, " (resumed)" if prepared.resumed else "",
                    run_url(prepared.tracking_uri, prepared.experiment_id, prepared.run_id))  # fmt: skip
        stored = trained_result(prepared.config)
        if stored is not None:
            logger.info("every epoch's checkpoint is registered in %s/%s: finishing the run without Ray",
                        prepared.config.training.storage_path, prepared.config.training.run_name)  # fmt: skip
            return finish_run(prepared, stored)
        ensure_ray()
        check_cluster_fits(prepared.config)
        result = fit_or_fail(prepared, build_trainer(prepared, callbacks))
        return finish_run(prepared, result)
