"""Train SD-DETR (or the Conditional DETR baseline) with Ray Train, tracked in MLflow.

    python pipelines/train.py                      # embedded default: synthetic data, local Ray + MLflow
    python pipelines/train.py --config configs/default.yaml --config configs/variants/conditional_detr.yaml \
        --set optimizer.epochs=20 --set training.run_name=baseline
    ray job submit --working-dir . -- python pipelines/train.py --set scaling.num_workers=4

The config is validated before Ray starts (exit code 2 with the offending fields); ``RAY_ADDRESS`` selects
a cluster, ``MLFLOW_TRACKING_URI`` (or ``tracking.tracking_uri``) the tracking store.
"""

from __future__ import annotations

import argparse

from pipelines.cli import add_config_arguments, fail, load_or_exit
from pipelines.config import DEFAULT_CONFIG, TrainJobConfig
from pipelines.tracking import TrackingUnavailableError
from pipelines.training import ClusterTooSmallError, print_summary, run_training


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, DEFAULT_CONFIG)
    args = parser.parse_args(argv)
    cfg = load_or_exit(TrainJobConfig, args.config, args.set, DEFAULT_CONFIG)
    try:
        outcome = run_training(cfg)
    except (TrackingUnavailableError, ClusterTooSmallError, FileNotFoundError, ValueError) as error:
        fail(str(error))
    print_summary(outcome, cfg)


if __name__ == "__main__":
    main()
