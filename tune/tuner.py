"""Ray Tune side of a sweep: its param space, its Tuner (new, or restored from ``<storage>/<sweep.name>``) with
ASHA on val AP, and which trials ended."""

from __future__ import annotations

import logging
from typing import Any

import ray.tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from tune.config import ALIGN_PATH, METRIC, SPLIT_PATH, TIME_ATTR, SweepConfig

logger = logging.getLogger(__name__)


def param_space(cfg: SweepConfig) -> dict[str, Any]:
    """Tune's param space, keyed by dotted config paths: grid search enumerates every value, random search
    draws ``num_samples`` trials (listed values become ``tune.choice``)."""
    sweep, grid = cfg.sweep, cfg.sweep.search == "grid"
    listed = ray.tune.grid_search if grid else ray.tune.choice
    weight = sweep.align_loss_weight
    match weight.kind:
        case "grid":
            space: dict[str, Any] = {ALIGN_PATH: listed(list(weight.values))}
        case "uniform":
            space = {ALIGN_PATH: ray.tune.uniform(weight.low, weight.high)}
        case "loguniform":
            space = {ALIGN_PATH: ray.tune.loguniform(weight.low, weight.high)}
    split = sweep.query_split
    if split.kind == "range" and not grid:
        space[SPLIT_PATH] = ray.tune.randint(split.low, split.high + 1)  # randint excludes its upper bound
    else:
        space[SPLIT_PATH] = listed(split.candidates())
    space |= {key: listed(list(values)) for key, values in sweep.extra.items()}
    return space


def build_tuner(cfg: SweepConfig, trainable: Any) -> tuple[ray.tune.Tuner, bool]:
    """The sweep's Tuner and whether it was restored: an interrupted sweep of the same name continues from the
    state Tune saved (its own search space included), otherwise a new one searches :func:`param_space`."""
    experiment_path = cfg.experiment_path()
    if ray.tune.Tuner.can_restore(experiment_path):
        logger.info("Resuming sweep %r from %s", cfg.sweep.name, experiment_path)
        return ray.tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True), True
    scheduler = None
    if cfg.sweep.asha.enabled:
        scheduler = ASHAScheduler(
            time_attr=TIME_ATTR,
            max_t=cfg.asha_max_t(),
            grace_period=cfg.sweep.asha.grace_period,
            reduction_factor=cfg.sweep.asha.reduction_factor,
            # Trials that reach the epoch budget end by themselves; a stop there would kill the trial actor
            # while its Train run finishes. Only a budget below optimizer.epochs is enforced by stopping.
            stop_last_trials=cfg.asha_max_t() < cfg.optimizer.epochs,
        )
    tuner = ray.tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=ray.tune.TuneConfig(
            metric=METRIC,
            mode="max",
            scheduler=scheduler,
            search_alg=BasicVariantGenerator(
                max_concurrent=cfg.sweep.max_concurrent_trials, random_state=cfg.sweep.seed
            ),
            num_samples=cfg.sweep.num_samples,
        ),
        run_config=ray.tune.RunConfig(
            name=cfg.sweep.name,
            storage_path=cfg.storage(),
            failure_config=ray.tune.FailureConfig(max_failures=0),
        ),
    )
    return tuner, False


def ended_trials(experiment_path: str) -> set[str]:
    """Ids of the trials that ended (finished, stopped by ASHA or failed), from the state Tune saved when its
    loop ended: after a Ctrl+C, the returned ResultGrid reports the trials it then stopped as TERMINATED too."""
    analysis = ray.tune.ExperimentAnalysis(experiment_path)
    return {trial.trial_id for trial in analysis.trials if trial.status in ("TERMINATED", "ERROR")}
