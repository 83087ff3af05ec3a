"""Finish the MLflow side of a training run later: log what the job could not, then register a checkpoint.

    python pipelines/register.py --checkpoint ray_results/sd-detr-synthetic/checkpoint_2026-12-01_10-00-00.000000
    python pipelines/register.py --checkpoint DIR --set tracking.tracking_uri=http://mlflow:5000 --set tracking.model_name=X
    python pipelines/register.py --checkpoint DIR --no-register     # only send the unlogged metrics/artifacts

`pipelines/train.py` exits with code 3 and prints this command when MLflow was unreachable at the end of a
job. The checkpoint folder holds the job config it was made with (``config.json``); ``--config`` files and
``--set`` overrides are layered on top of it (e.g. another tracking URI or model name). The MLflow run is the
one the job logged to (``tracking.json`` in the run's storage folder, the checkpoint's parent), else the run
tagged with the run name, else a new run. Metrics and artifacts the job kept in its storage folder
(``unlogged_metrics.jsonl``, ``unlogged_artifacts/``) are sent first, each once; then the checkpoint's model is
registered under ``tracking.model_name`` and ``tracking.alias`` moves to it if its val AP beats the aliased
version's. Exit codes: 0 done (or already done), 2 bad input or MLflow unreachable, 3 MLflow failed midway
(rerun the command).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

from pipelines.checkpoint import CHECKPOINT_FILE, checkpoint_config_json, checkpoint_metrics
from pipelines.cli import TRACKING_INCOMPLETE_EXIT_CODE, add_config_arguments, configure_logging, fail, load_or_exit
from pipelines.config import TrainJobConfig
from pipelines.metrics_outbox import RunStorage, TrackingOutbox, bound_http_retries
from pipelines.run_outcome import register_checkpoint_dir, registered_version_of
from pipelines.run_setup import TRACKING_FILE, PreparedRun
from pipelines.tracking import (
    AliasNotMovedError,
    TrackingUnavailableError,
    check_reachable,
    client_for,
    find_run,
    get_or_create_experiment,
    move_alias,
    start_or_resume_run,
)
from sd_detr.config import flatten_config
from sd_detr.names import VAL_AP

logger = logging.getLogger("pipelines.register")  # by name: run as a script, __name__ is "__main__"


def load_job_config(checkpoint: Path, files: list[Path], overrides: list[str]) -> TrainJobConfig:
    """The checkpoint's job config with ``files`` and ``overrides`` on top (exit 2 when invalid)."""
    with tempfile.TemporaryDirectory(prefix="sd-detr-register-") as directory:
        base = Path(directory) / "checkpoint_config.json"
        base.write_text(json.dumps(checkpoint_config_json(checkpoint)))
        return load_or_exit(TrainJobConfig, [base, *files], overrides, None).with_absolute_paths()


def resolve_run(cfg: TrainJobConfig, storage: RunStorage) -> tuple[str, str]:
    """(experiment id, run id) to log to: the job's own run (``tracking.json``) when it is on this tracking
    store, else the newest run tagged with the run name, else a new run with the config as params."""
    uri = cfg.tracking.tracking_uri
    client = client_for(uri)
    recorded = json.loads(storage.read_text(TRACKING_FILE) or "{}")
    if recorded.get("tracking_uri") == uri and recorded.get("run_id"):
        try:
            run = client.get_run(recorded["run_id"])
            return run.info.experiment_id, run.info.run_id
        except Exception as error:  # deleted, or another store at the same URI: fall back to the name
            logger.warning("run %s from %s not found (%s); looking it up by name", recorded["run_id"], TRACKING_FILE,
                           error)  # fmt: skip
    experiment_id = get_or_create_experiment(client, cfg.tracking.experiment, cfg.tracking.artifact_root, uri)
    existing = find_run(client, experiment_id, cfg.training.run_name)
    if existing is not None:
        return experiment_id, existing
    run_id, _ = start_or_resume_run(client, experiment_id, cfg.training.run_name, flatten_config(cfg))
    return experiment_id, run_id


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint folder (with state.pt)")
    parser.add_argument("--no-register", action="store_true", help="only log what was not logged")
    add_config_arguments(parser, None)
    args = parser.parse_args(argv)
    configure_logging()
    checkpoint = args.checkpoint.expanduser().resolve()
    if not (checkpoint / CHECKPOINT_FILE).is_file():
        fail(f"{checkpoint} is not a training checkpoint ({CHECKPOINT_FILE} not found in it)")
    cfg = load_job_config(checkpoint, list(args.config or []), list(args.set))
    uri = cfg.tracking.tracking_uri
    bound_http_retries()
    try:
        check_reachable(uri)
    except TrackingUnavailableError as error:
        fail(str(error))
    storage = RunStorage(str(checkpoint.parent.parent), checkpoint.parent.name)
    client = client_for(uri)
    try:
        experiment_id, run_id = resolve_run(cfg, storage)
        outbox = TrackingOutbox.open(client, run_id, storage)
        if outbox.pending or outbox.unsent_artifacts():
            logger.info("sending what the job could not log: %s", outbox.describe())
        if not outbox.flush():
            raise ConnectionError(outbox.last_error)
        if not args.no_register:
            val_ap = checkpoint_metrics(checkpoint).get(VAL_AP)
            if val_ap is None:
                fail(f"{checkpoint} has no val_AP in its metrics.json: cannot compare it with the champion")
            before = registered_version_of(client, run_id, checkpoint.name, cfg.tracking.model_name)
            if before is not None:  # registered by the job or an earlier call: only the alias is (re)tried
                logger.info("%s is already registered as version %s", checkpoint.name, before)
                version = before
                aliased = move_alias(client, cfg.tracking.model_name, cfg.tracking.alias, before, float(val_ap))
            else:
                prepared = PreparedRun(cfg, uri, experiment_id, run_id, resumed=True)
                version, aliased = register_checkpoint_dir(prepared, checkpoint, float(val_ap), checkpoint.name)
            state = "points at it" if aliased else "kept"
            logger.info("models:/%s/%s (val AP %.4f), @%s %s", cfg.tracking.model_name, version, val_ap,
                        cfg.tracking.alias, state)  # fmt: skip
        client.set_terminated(run_id, status="FINISHED")
    except SystemExit:
        raise
    except AliasNotMovedError as error:
        if error.needs_hand:
            fail(f"{error}; once fixed, rerun this command", code=TRACKING_INCOMPLETE_EXIT_CODE)
        fail(f"MLflow at {uri} failed midway ({error}); rerun this command (the version is not registered twice)",
             code=TRACKING_INCOMPLETE_EXIT_CODE)  # fmt: skip
    except Exception as error:
        fail(f"MLflow at {uri} failed midway ({type(error).__name__}: {str(error)[:300]}); rerun this command "
             "(what was sent is not sent twice)", code=TRACKING_INCOMPLETE_EXIT_CODE)  # fmt: skip
    logger.info("MLflow run %s is complete", run_id)


if __name__ == "__main__":
    main()
