"""Ray Tune sweep over SD-DETR's alignment-loss weight and query split, tracked in MLflow.

    python tune/sweep.py                                           # configs/default.yaml + tune/sweep.yaml
    python tune/sweep.py --config configs/default.yaml --config tune/sweep.yaml \\
        --set sweep.search=random --set sweep.num_samples=8 --set sweep.name=w-split-random
    ray job submit --working-dir . -- python tune/sweep.py --set scaling.use_gpu=true

Each trial fits the TorchTrainer of `pipelines/train.py` (its MLflow run nested under the sweep's parent run);
ASHA stops weak trials on val AP. At the end: a table of trials sorted by val AP, the table and an AP heat map
logged on the parent run, the best trial's model registered (alias moved when it beats the current one), and
the best config written as a `pipelines/train.py --config` file. Rerunning the same ``sweep.name`` resumes an
interrupted sweep (Ctrl+C once stops it cleanly): finished trials are kept, unfinished ones continue from
their last checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.tune
from mlflow.tracking import MlflowClient
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from pipelines.cli import add_config_arguments, fail, load_or_exit
from pipelines.config import DEFAULT_CONFIG, TrainJobConfig
from pipelines.metrics_outbox import RunStorage, TrackingOutbox, registered_checkpoint_epoch
from pipelines.tags import (
    BEST_PARAMS_TAG,
    BEST_RUN_ID_TAG,
    OUTCOME_TAG,
    PARENT_RUN_ID_TAG,
    REGISTERED_VERSION_TAG,
    RUN_NAME_TAG,
    SWEEP_TAG,
)  # fmt: skip
from pipelines.tracking import (
    TrackingUnavailableError,
    check_reachable,
    client_for,
    find_run,
    get_or_create_experiment,
    log_metrics,
    log_text_artifact,
    run_url,
    start_or_resume_run,
)
from pipelines.training import (
    ClusterTooSmallError,
    PreparedRun,
    check_backbone_init,
    check_cluster_fits,
    ensure_ray,
    register_checkpoint,
    resolve_data,
    select_best_checkpoint,
)
from sd_detr.config import flatten_config
from sd_detr.names import BEST_VAL_AP, VAL_AP
from tune.cluster import check_sweep_fits, release_orphaned_placement_groups
from tune.config import ALIGN_PATH, METRIC, SPLIT_PATH, TIME_ATTR, SweepConfig, build_trial_config
from tune.report import (
    TrialRow,
    best_config_yaml,
    best_row,
    csv_table,
    format_table,
    heatmap_png,
    markdown_table,
    sort_rows,
    trial_row,
)
from tune.trial import TrialSetup, run_trial

logger = logging.getLogger(__name__)

SWEEP_CONFIG = Path(__file__).resolve().parent / "sweep.yaml"
# What a resumed sweep must keep: its search space and what defines a trial (model, loss, recipe).
FIXED_PARAM_PREFIXES = ("sweep.align_loss_weight.", "sweep.query_split.", "sweep.extra.", "sweep.search",
                        "sweep.num_samples", "sweep.seed", "model.", "matcher.", "loss.", "optimizer.")  # fmt: skip


@dataclass
class SweepOutcome:
    """What a sweep left behind (``interrupted``: rerun the same config to resume it)."""

    parent_run_id: str
    experiment_path: str
    restored: bool
    interrupted: bool
    rows: list[TrialRow]
    trials_done: int
    best: TrialRow | None = None
    best_run_id: str | None = None
    registered_version: str | None = None
    aliased: bool = False
    best_config_path: Path | None = None


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


def _check_same_search(client: MlflowClient, parent_run_id: str, cfg: SweepConfig) -> None:
    """A resumed sweep must search what it searched before (Tune restores its own saved space) with the same
    trial model and recipe (its finished trials would otherwise be compared with differently trained ones).
    Data, scaling, storage and tracking settings may change."""
    logged = client.get_run(parent_run_id).data.params
    current = flatten_config(cfg)
    changed = sorted(
        key
        for key in set(logged) | set(current)
        if key.startswith(FIXED_PARAM_PREFIXES)
        and key not in (ALIGN_PATH, SPLIT_PATH)  # the trials' own values replace these
        and logged.get(key) != current.get(key)
    )
    if changed:
        raise ValueError(
            f"sweep {cfg.sweep.name!r} already exists with other settings ({', '.join(changed)} differ); "
            "rerun it with its original config or choose a new sweep.name"
        )


def _build_tuner(cfg: SweepConfig, trainable: Any) -> tuple[ray.tune.Tuner, bool]:
    experiment_path = cfg.experiment_path()
    if ray.tune.Tuner.can_restore(experiment_path):
        print(f"Resuming sweep {cfg.sweep.name!r} from {experiment_path}", flush=True)
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


def _ended_trials(experiment_path: str) -> set[str]:
    """Ids of the trials that ended (finished, stopped by ASHA or failed), from the state Tune saved when its
    loop ended: after a Ctrl+C, the returned ResultGrid reports the trials it then stopped as TERMINATED too."""
    analysis = ray.tune.ExperimentAnalysis(experiment_path)
    return {trial.trial_id for trial in analysis.trials if trial.status in ("TERMINATED", "ERROR")}


def _close_child_runs(
    client: MlflowClient, experiment_id: str, rows: list[TrialRow], storage_path: str
) -> dict[str, str]:
    """Set each trial's MLflow run status from the Tune outcome (a trial stopped by ASHA was killed before it
    could close its run) and log its final AP. Returns trial id -> run id.

    A trial's worker sends an epoch's metrics only once Ray Train has registered that epoch's checkpoint, so a
    trial that ASHA stopped right after a report leaves that epoch in its outbox (in its storage folder):
    it is sent here, for every epoch whose checkpoint was registered."""
    run_ids = {}
    status = {"finished": "FINISHED", "stopped": "KILLED", "error": "FAILED"}
    for row in rows:
        run_id = find_run(client, experiment_id, row.run_name)
        if run_id is None:  # the trial failed before creating its run
            continue
        run_ids[row.trial_id] = run_id
        storage = RunStorage(storage_path, row.run_name)
        outbox = TrackingOutbox.open(client, run_id, storage)
        outbox.flush(durable_through=registered_checkpoint_epoch(storage))
        if outbox.last_error is not None:
            logger.warning("trial %s: not sent to MLflow (%s): %s", row.trial_id, outbox.last_error, outbox.describe())
        run = client.get_run(run_id)
        client.set_tag(run_id, OUTCOME_TAG, "stopped_by_asha" if row.status == "stopped" else row.status)
        if "final_val_AP" not in run.data.metrics:  # a rerun of a finished sweep logs nothing twice
            final = {"final_val_AP": row.last_val_ap, TIME_ATTR: float(row.epochs_done)}
            log_metrics(client, run_id, final, step=max(row.epochs_done - 1, 0))
        if run.info.status != status[row.status]:
            client.set_terminated(run_id, status=status[row.status])
    return run_ids


def _close_interrupted(client: MlflowClient, experiment_id: str, parent_run_id: str) -> None:
    """Mark the runs a Ctrl+C cut short (parent and running trials) KILLED; resuming sets them RUNNING again."""
    for run in client.search_runs([experiment_id], f"tags.`{PARENT_RUN_ID_TAG}` = '{parent_run_id}'"):
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, OUTCOME_TAG, "interrupted")
            client.set_terminated(run.info.run_id, status="KILLED")
    client.set_tag(parent_run_id, OUTCOME_TAG, "interrupted")
    client.set_terminated(parent_run_id, status="KILLED")


def _register_best(
    cfg: SweepConfig, job: dict[str, Any], best: TrialRow, run_id: str, uri: str, experiment_id: str
) -> tuple[str | None, bool]:
    """Register the best checkpoint of the best trial's Train run (once: a rerun of a finished sweep reuses
    the version it registered)."""
    client = client_for(uri)
    done = client.get_run(run_id).data.tags.get(REGISTERED_VERSION_TAG)
    if done is not None:
        try:
            aliased = str(client.get_model_version_by_alias(cfg.tracking.model_name, cfg.tracking.alias).version)
        except Exception:  # the alias was removed since
            aliased = None
        return done, aliased == done
    trial_cfg = build_trial_config(job, best.params, best.run_name)
    result = ray.train.Result.from_path(f"{trial_cfg.training.storage_path.rstrip('/')}/{best.run_name}")
    checkpoint, metrics = select_best_checkpoint(result)
    if checkpoint is None:
        return None, False
    prepared = PreparedRun(trial_cfg, uri, experiment_id, run_id, resumed=True)
    status = client.get_run(run_id).info.status
    registered = register_checkpoint(prepared, checkpoint, float(metrics[VAL_AP]))
    client.set_terminated(run_id, status=status)  # logging the model through MLflow's fluent API ends it FINISHED
    return registered


def _log_summary(
    client: MlflowClient, parent_run_id: str, cfg: SweepConfig, rows: list[TrialRow], seconds: float
) -> None:
    counts = {status: sum(r.status == status for r in rows) for status in ("finished", "stopped", "error")}
    metrics = {"trials": float(len(rows)), "sweep_seconds": seconds}
    metrics |= {f"trials_{status}": float(n) for status, n in counts.items()}
    best = best_row(rows)
    if best is not None:
        metrics[BEST_VAL_AP] = best.best_val_ap
    log_metrics(client, parent_run_id, metrics, step=0)
    log_text_artifact(client, parent_run_id, csv_table(rows), "sweep/trials.csv")
    log_text_artifact(client, parent_run_id, markdown_table(rows), "sweep/trials.md")
    with tempfile.TemporaryDirectory() as directory:
        title = f"{cfg.sweep.name}: best val AP per (align_loss_weight, query_split)"
        path = heatmap_png(rows, Path(directory) / "ap_heatmap.png", title)
        client.log_artifact(parent_run_id, str(path), artifact_path="sweep")


def run_sweep(cfg: SweepConfig) -> SweepOutcome:
    """Run (or resume) the sweep of ``cfg`` to the end: trials, MLflow parent/child runs, summary, registered
    best model, best config file."""
    started = time.perf_counter()
    check_backbone_init(cfg)  # before tracking, data and Ray: the trials share the backbone's weights
    given, cfg = cfg, cfg.with_absolute_paths()
    uri = cfg.tracking.tracking_uri
    check_reachable(uri)
    # Resolve the dataset once here (trials would race to generate the synthetic one).
    resolved = resolve_data(TrainJobConfig.model_validate(cfg.job_config_dict()))
    job = resolved.model_dump(mode="json", exclude_unset=True)
    client = client_for(uri)
    experiment_id = get_or_create_experiment(client, cfg.tracking.experiment, cfg.tracking.artifact_root, uri)
    existing = find_run(client, experiment_id, cfg.sweep.name)
    if existing is not None:
        _check_same_search(client, existing, cfg)
    parent_run_id, _ = start_or_resume_run(client, experiment_id, cfg.sweep.name, flatten_config(cfg))
    client.set_tag(parent_run_id, SWEEP_TAG, cfg.sweep.name)
    print(f"Sweep {cfg.sweep.name!r}: {cfg.num_trials()} trials, MLflow parent run {parent_run_id}: "
          f"{run_url(uri, experiment_id, parent_run_id)}", flush=True)  # fmt: skip

    ensure_ray()
    release_orphaned_placement_groups()  # e.g. left by a Ctrl+C that cut this sweep while a trial was starting
    check_cluster_fits(resolved)
    scaling = resolved.scaling
    check_sweep_fits(
        scaling.num_workers * scaling.cpus_per_worker + cfg.sweep.trial_cpus,
        cfg.sweep.max_concurrent_trials,
        resolved.data.loader.decode_num_cpus,
    )
    experiment_path = cfg.experiment_path()
    setup = TrialSetup(job=job, sweep_name=cfg.sweep.name, parent_run_id=parent_run_id)
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, setup=setup), {"CPU": cfg.sweep.trial_cpus})
    tuner, restored = _build_tuner(cfg, trainable)
    grid = tuner.fit()

    ended = _ended_trials(experiment_path)
    rows = [
        trial_row(cfg.sweep.name, int(r.config.get("optimizer.epochs", cfg.optimizer.epochs)),
                  r.metrics["trial_id"], r.config, r.metrics, r.error)
        for r in grid
        if r.metrics["trial_id"] in ended
    ]  # fmt: skip
    run_ids = _close_child_runs(client, experiment_id, rows, resolved.training.storage_path)
    if len(rows) < len(grid):  # Ctrl+C: Tune saved its state, stopped the running trials and returned
        _close_interrupted(client, experiment_id, parent_run_id)
        return SweepOutcome(parent_run_id, experiment_path, restored, True, [], trials_done=len(rows))
    outcome = SweepOutcome(parent_run_id, experiment_path, restored, False, sort_rows(rows), trials_done=len(rows))
    _log_summary(client, parent_run_id, cfg, outcome.rows, time.perf_counter() - started)
    outcome.best = best_row(rows)
    if outcome.best is not None and outcome.best.trial_id in run_ids:
        best = outcome.best
        outcome.best_run_id = run_ids[best.trial_id]
        outcome.registered_version, outcome.aliased = _register_best(
            cfg, job, best, outcome.best_run_id, uri, experiment_id
        )
        path = cfg.best_config_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(best_config_yaml(given, best.params, resolved.model.num_classes))
        outcome.best_config_path = path
        log_text_artifact(client, parent_run_id, path.read_text(), "sweep/best_config.yaml")
        client.set_tag(parent_run_id, BEST_RUN_ID_TAG, outcome.best_run_id)
        client.set_tag(parent_run_id, BEST_PARAMS_TAG, str(best.params))
        if outcome.registered_version is not None:
            client.set_tag(parent_run_id, REGISTERED_VERSION_TAG, outcome.registered_version)
    client.set_tag(parent_run_id, OUTCOME_TAG, "finished")
    client.set_terminated(parent_run_id, status="FINISHED")
    return outcome


def print_outcome(outcome: SweepOutcome, cfg: SweepConfig) -> None:
    """The end-of-sweep report: trials sorted by val AP, best trial, registered model, best config file."""
    if outcome.interrupted:
        print(f"== sd-detr sweep {cfg.sweep.name!r} interrupted after {outcome.trials_done} of {cfg.num_trials()} "
              f"trials; rerun the same command to resume it ({outcome.experiment_path})", flush=True)  # fmt: skip
        return
    print(f"== sd-detr sweep {cfg.sweep.name!r}: trials sorted by best val AP (COCO AP over epochs)")
    print(format_table(outcome.rows))
    if outcome.best is not None:
        print(f"   best          : {outcome.best.params} val AP {outcome.best.best_val_ap:.4f}")
        print(f"   best run id   : {outcome.best_run_id}")
    if outcome.registered_version is not None:
        alias = f", alias @{cfg.tracking.alias} moved" if outcome.aliased else f", @{cfg.tracking.alias} kept"
        print(f"   registered    : models:/{cfg.tracking.model_name}/{outcome.registered_version}{alias}")
    if outcome.best_config_path is not None:
        print(f"   best config   : {outcome.best_config_path}")
        print(f"   final run     : python pipelines/train.py --config {outcome.best_config_path}")
    print(f"   MLflow parent : {outcome.parent_run_id} (tag {RUN_NAME_TAG}={cfg.sweep.name})", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, DEFAULT_CONFIG)
    args = parser.parse_args(argv)
    cfg = load_or_exit(SweepConfig, args.config or [DEFAULT_CONFIG, SWEEP_CONFIG], args.set, None)
    try:
        outcome = run_sweep(cfg)
    except (TrackingUnavailableError, ClusterTooSmallError, FileNotFoundError, ValueError) as error:
        fail(str(error))
    print_outcome(outcome, cfg)
    if outcome.interrupted:
        raise SystemExit(130)
    if outcome.best is None:
        fail("no trial reported a val AP", code=1)


if __name__ == "__main__":
    main()
