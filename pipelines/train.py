"""Train SD-DETR (or the Conditional DETR baseline) with Ray Train, tracked in MLflow.

    python pipelines/train.py                      # embedded default: synthetic data, local Ray + MLflow
    python pipelines/train.py --config configs/default.yaml --config configs/variants/conditional_detr.yaml \
        --set optimizer.epochs=20 --set training.run_name=baseline
    ray job submit --working-dir . -- python pipelines/train.py --set scaling.num_workers=4

The config is validated before Ray starts (exit code 2 with the offending fields), and so are the backbone's
weights (``model.backbone.weights_path`` must exist and fit the ResNet, or ``model.backbone.pretrained=false``
must say the backbone is random on purpose), the tracking store and the shard directories (the val shards
must carry their cleaned ground truth). ``RAY_ADDRESS`` selects a cluster, ``MLFLOW_TRACKING_URI`` (or
``tracking.tracking_uri``) the tracking store.

Rerunning a ``training.run_name`` resumes its last checkpoint; a checkpoint made with a different model or
optimisation config is refused (exit code 2, naming the differing fields), and so is a second job on the same
run name and storage path while one runs. If MLflow goes away during training, training goes on and what
could not be logged is kept beside the checkpoints; if it is still unreachable at the end, the job exits with
code 3 and prints the `pipelines/register.py` command that logs it and registers the model later. If
training itself fails (a worker error past ``training.max_failures`` restarts), the MLflow run is marked
FAILED and the job exits with code 1, naming each failed rank's error; the checkpoints stay, and rerunning
the same command resumes from the last one.
"""

from __future__ import annotations

import argparse

from pipelines.cli import (
    TRACKING_INCOMPLETE_EXIT_CODE,
    TRAINING_FAILED_EXIT_CODE,
    add_config_arguments,
    configure_logging,
    fail,
    load_or_exit,
)
from pipelines.config import DEFAULT_CONFIG, TrainJobConfig
from pipelines.ray_cluster import ClusterTooSmallError
from pipelines.run_outcome import TrackingIncompleteError, TrainingFailed, log_summary
from pipelines.tracking import TrackingUnavailableError
from pipelines.training import run_training
from sd_detr.data.lock import LockHeldError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, DEFAULT_CONFIG)
    args = parser.parse_args(argv)
    configure_logging()
    cfg = load_or_exit(TrainJobConfig, args.config, args.set, DEFAULT_CONFIG)
    try:
        outcome = run_training(cfg)
    except (TrackingUnavailableError, ClusterTooSmallError, LockHeldError, FileNotFoundError, ValueError) as error:
        fail(str(error))
    except TrackingIncompleteError as error:
        log_summary(error.outcome, cfg)
        fail(str(error), code=TRACKING_INCOMPLETE_EXIT_CODE)
    except TrainingFailed as error:
        fail(str(error), code=TRAINING_FAILED_EXIT_CODE)
    log_summary(outcome, cfg)


if __name__ == "__main__":
    main()
