"""Ray Tune sweep over SD-DETR's alignment-loss weight and query split, tracked in MLflow.

    python tune/sweep.py                                           # configs/default.yaml + tune/sweep.yaml
    python tune/sweep.py --config configs/default.yaml --config tune/sweep.yaml \\
        --set sweep.search=random --set sweep.num_samples=8 --set sweep.name=w-split-random
    ray job submit --working-dir . -- python tune/sweep.py --set scaling.use_gpu=true \\
        --set training.storage_path=/shared/ray_results --set data.synthetic_root=/shared/data/synthetic

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

import ray.tune

from pipelines.cli import (
    TRACKING_INCOMPLETE_EXIT_CODE,
    TRAINING_FAILED_EXIT_CODE,
    add_config_arguments,
    configure_logging,
    fail,
    load_or_exit,
)
from pipelines.config import DEFAULT_CONFIG, TrainJobConfig
from pipelines.ray_cluster import ClusterTooSmallError, check_cluster_fits, ensure_ray
from pipelines.run_guard import check_sweep_settings, record_sweep_settings, sweep_lock
from pipelines.run_setup import check_backbone_init, resolve_data
from pipelines.sweep_tracking import (
    close_interrupted_sweep,
    close_trial_runs,
    finish_sweep_run,
    log_sweep_summary,
    open_sweep_run,
    register_best_trial,
    tag_best_trial,
)
from pipelines.tags import RUN_NAME_TAG
from pipelines.tracking import (
    AliasNotMovedError,
    TrackingUnavailableError,
    check_reachable,
    client_for,
    get_or_create_experiment,
    run_url,
)
from sd_detr.config import flatten_config
from sd_detr.data.lock import LockHeldError
from tune.cluster import check_sweep_fits, release_orphaned_placement_groups
from tune.config import RESUME_FIXED_PREFIXES, SweepConfig, build_trial_config
from tune.report import (
    TrialRow,
    best_config_yaml,
    best_row,
    csv_table,
    format_table,
    heatmap_png,
    markdown_table,
    sort_rows,
    summary_metrics,
    trial_row,
)
from tune.trial import TrialSetup, run_trial
from tune.tuner import build_tuner, ended_trials

logger = logging.getLogger("tune.sweep")  # by name: run as a script, __name__ is "__main__"

SWEEP_CONFIG = Path(__file__).resolve().parent / "sweep.yaml"


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
    alias_error: AliasNotMovedError | None = None
    best_config_path: Path | None = None


def run_sweep(cfg: SweepConfig) -> SweepOutcome:
    """Run (or resume) the sweep of ``cfg`` to the end: trials, MLflow parent/child runs, summary, registered
    best model, best config file. One driver per sweep name and storage at a time (:func:`sweep_lock`).

    Raises:
        LockHeldError: another driver runs this sweep (its pid, host and start time in the message).
    """
    check_backbone_init(cfg)  # before tracking, data and Ray: the trials share the backbone's weights
    with sweep_lock(cfg.storage(), cfg.sweep.name):
        return _run_locked_sweep(cfg)


def _run_locked_sweep(cfg: SweepConfig) -> SweepOutcome:
    started = time.perf_counter()
    given, cfg = cfg, cfg.with_absolute_paths()
    keys = cfg.search_keys()
    params, searched = flatten_config(cfg), {key.path for key in keys}
    experiment_path = cfg.experiment_path()
    if ray.tune.Tuner.can_restore(experiment_path):  # before MLflow and Ray: restored trials would mix settings
        check_sweep_settings(cfg.storage(), cfg.sweep.name, params, RESUME_FIXED_PREFIXES, searched)
    uri = cfg.tracking.tracking_uri
    check_reachable(uri)
    # Resolve the dataset once here (trials would race to generate the synthetic one).
    resolved = resolve_data(TrainJobConfig.model_validate(cfg.job_config_dict()))
    job = resolved.model_dump(mode="json", exclude_unset=True)
    ensure_ray()  # the cluster is checked before the parent run opens: a sweep that cannot run leaves none RUNNING
    release_orphaned_placement_groups()  # e.g. left by a Ctrl+C that cut this sweep while a trial was starting
    check_cluster_fits(resolved)
    scaling = resolved.scaling
    check_sweep_fits(
        scaling.num_workers * scaling.cpus_per_worker + cfg.sweep.trial_cpus,
        cfg.sweep.max_concurrent_trials,
        resolved.data.loader.decode_num_cpus,
    )
    client = client_for(uri)
    experiment_id = get_or_create_experiment(client, cfg.tracking.experiment, cfg.tracking.artifact_root, uri)
    parent_run_id = open_sweep_run(client, experiment_id, cfg.sweep.name, params, RESUME_FIXED_PREFIXES, searched)
    logger.info("Sweep %r: %d trials, MLflow parent run %s: %s", cfg.sweep.name, cfg.num_trials(), parent_run_id,
                run_url(uri, experiment_id, parent_run_id))  # fmt: skip
    setup = TrialSetup(job=job, sweep_name=cfg.sweep.name, parent_run_id=parent_run_id, search_keys=tuple(keys))
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, setup=setup), {"CPU": cfg.sweep.trial_cpus})
    tuner, restored = build_tuner(cfg, trainable)
    if not restored:
        record_sweep_settings(cfg.storage(), cfg.sweep.name, params, RESUME_FIXED_PREFIXES)
    grid = tuner.fit()

    ended = ended_trials(experiment_path)
    rows = [
        trial_row(cfg.sweep.name, keys, int(r.config.get("optimizer.epochs", cfg.optimizer.epochs)),
                  r.metrics["trial_id"], r.config, r.metrics, r.error)
        for r in grid
        if r.metrics["trial_id"] in ended
    ]  # fmt: skip
    run_ids = close_trial_runs(client, experiment_id, [row.ended() for row in rows], resolved.training.storage_path)
    if len(rows) < len(grid):  # Ctrl+C: Tune saved its state, stopped the running trials and returned
        close_interrupted_sweep(client, experiment_id, parent_run_id)
        return SweepOutcome(parent_run_id, experiment_path, restored, True, [], trials_done=len(rows))
    outcome = SweepOutcome(parent_run_id, experiment_path, restored, False, sort_rows(rows), trials_done=len(rows))
    with tempfile.TemporaryDirectory() as directory:
        heatmap = heatmap_png(outcome.rows, keys, Path(directory) / "ap_heatmap.png", cfg.sweep.name)
        tables = {"trials.csv": csv_table(outcome.rows, keys), "trials.md": markdown_table(outcome.rows, keys)}
        metrics = summary_metrics(outcome.rows, time.perf_counter() - started)
        log_sweep_summary(client, parent_run_id, metrics, tables, [heatmap] if heatmap is not None else [])
    outcome.best = best_row(rows)
    if outcome.best is not None and outcome.best.trial_id in run_ids:
        best = outcome.best
        outcome.best_run_id = run_ids[best.trial_id]
        trial_cfg = build_trial_config(job, best.params, best.run_name)
        path = cfg.best_config_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(best_config_yaml(given, best.params, resolved.model.num_classes))
        outcome.best_config_path = path
        if trial_cfg.tracking.register_model:  # the only registration of a sweep (trials register nothing)
            try:
                outcome.registered_version, outcome.aliased = register_best_trial(
                    trial_cfg, outcome.best_run_id, uri, experiment_id
                )
            except AliasNotMovedError as error:  # registered; a rerun retries only the alias
                outcome.registered_version, outcome.alias_error = error.version, error
        tag_best_trial(client, parent_run_id, outcome.best_run_id, best.params, path.read_text(),
                       outcome.registered_version)  # fmt: skip
    finish_sweep_run(client, parent_run_id)
    return outcome


def log_outcome(outcome: SweepOutcome, cfg: SweepConfig) -> None:
    """The end-of-sweep report: trials sorted by val AP, best trial, registered model, best config file."""
    if outcome.interrupted:
        logger.info("== sd-detr sweep %r interrupted after %d of %d trials; rerun the same command to resume it (%s)",
                    cfg.sweep.name, outcome.trials_done, cfg.num_trials(), outcome.experiment_path)  # fmt: skip
        return
    lines = [
        f"== sd-detr sweep {cfg.sweep.name!r}: trials sorted by best val AP (COCO AP over epochs), failed ones last",
        format_table(outcome.rows, cfg.search_keys()),
    ]
    if outcome.best is not None:
        lines.append(f"   best          : {outcome.best.params} val AP {outcome.best.best_val_ap:.4f}")
        lines.append(f"   best run id   : {outcome.best_run_id}")
    if outcome.registered_version is not None:
        alias = f", alias @{cfg.tracking.alias} moved" if outcome.aliased else f", @{cfg.tracking.alias} kept"
        if outcome.alias_error is not None:
            alias = f", @{cfg.tracking.alias} NOT compared or moved"
        lines.append(f"   registered    : models:/{cfg.tracking.model_name}/{outcome.registered_version}{alias}")
    if outcome.best_config_path is not None:
        lines.append(f"   best config   : {outcome.best_config_path}")
        lines.append(f"   final run     : python pipelines/train.py --config {outcome.best_config_path}")
    lines.append(f"   MLflow parent : {outcome.parent_run_id} (tag {RUN_NAME_TAG}={cfg.sweep.name})")
    logger.info("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, [DEFAULT_CONFIG, SWEEP_CONFIG])
    args = parser.parse_args(argv)
    configure_logging()
    cfg = load_or_exit(SweepConfig, args.config or [DEFAULT_CONFIG, SWEEP_CONFIG], args.set, None)
    try:
        outcome = run_sweep(cfg)
    except (TrackingUnavailableError, ClusterTooSmallError, LockHeldError, FileNotFoundError, ValueError) as error:
        fail(str(error))
    log_outcome(outcome, cfg)
    if outcome.interrupted:
        raise SystemExit(130)
    if outcome.best is None:
        fail("no trial reported a val AP", code=TRAINING_FAILED_EXIT_CODE)
    if outcome.alias_error is not None:
        retry = "once the registry is fixed, rerun" if outcome.alias_error.needs_hand else "rerun"
        fail(
            f"{outcome.alias_error}\n  {retry} the same command: the finished sweep trains nothing and retries only "
            "the alias",
            code=TRACKING_INCOMPLETE_EXIT_CODE,
        )


if __name__ == "__main__":
    main()
