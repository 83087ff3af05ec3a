"""Ray Tune side of a sweep: its param space, its Tuner (new, or restored from ``<storage>/<sweep.name>``) with
ASHA on val AP, and which trials ended."""

from __future__ import annotations

import logging
from typing import Any

import ray.tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from tune.config import ALIGN_PATH, METRIC, SPLIT_PATH, TIME_ATTR, SweepConfig

logger = logging.getLogger(__name__)


class FinalEpochASHA(ASHAScheduler):
    """ASHA that never stops a trial on the result of its last epoch (``epochs_done == final_epoch``).

    A trial there ends by itself; a stop would kill the trial actor while its Train run registers the last
    checkpoint and closes its MLflow run. Plain ASHA can: its top rung lands on ``max_t`` whenever
    ``max_t / grace_period`` is a power of ``reduction_factor`` (e.g. 8 epochs, grace 2, factor 2), and a trial
    below that rung's cutoff is stopped there. The result still counts towards the rung's cutoff. Only a
    budget below ``optimizer.epochs`` (``sweep.asha.max_t``) is enforced by stopping (``stop_last_trials``).
    """

    def __init__(self, *, final_epoch: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.final_epoch = final_epoch

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and result.get(TIME_ATTR, 0) >= self.final_epoch:
            self._num_stopped -= 1
            return TrialScheduler.CONTINUE
        return action


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


def build_scheduler(cfg: SweepConfig) -> FinalEpochASHA | None:
    """ASHA on ``epochs_done`` with the sweep's grace period, reduction factor and budget; None when disabled."""
    if not cfg.sweep.asha.enabled:
        return None
    return FinalEpochASHA(
        final_epoch=cfg.optimizer.epochs,
        time_attr=TIME_ATTR,
        max_t=cfg.asha_max_t(),
        grace_period=cfg.sweep.asha.grace_period,
        reduction_factor=cfg.sweep.asha.reduction_factor,
        stop_last_trials=cfg.asha_max_t() < cfg.optimizer.epochs,
    )


def build_tuner(cfg: SweepConfig, trainable: Any) -> tuple[ray.tune.Tuner, bool]:
    """The sweep's Tuner and whether it was restored: an interrupted sweep of the same name continues from the
    state Tune saved (its own search space included), otherwise a new one searches :func:`param_space`."""
    experiment_path = cfg.experiment_path()
    if ray.tune.Tuner.can_restore(experiment_path):
        logger.info("Resuming sweep %r from %s", cfg.sweep.name, experiment_path)
        return ray.tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True), True
    scheduler = build_scheduler(cfg)
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
