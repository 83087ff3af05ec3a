"""The Ray cluster a job runs on: join or start it, and check that the job's workers fit before asking for them."""

from __future__ import annotations

import os
import socket

import ray

from pipelines.config import TrainJobConfig


class ClusterTooSmallError(RuntimeError):
    """The cluster cannot host the requested workers (Ray would wait forever)."""


def ensure_ray() -> None:
    """Join ``$RAY_ADDRESS`` or start a local Ray (once per process), telling the job's actors where the
    cluster is: ``RAY_ADDRESS`` when joining, the local dashboard URL otherwise.

    Ray Train's placement-group cleaner looks the cluster up by itself; on a host where a ``ray start`` left
    its address file behind it would ask that (dead) cluster, time out and give up, leaving a stopped run's
    workers reserved. ``address="local"`` likewise never attaches to such a stale cluster.
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": {"RAY_ADDRESS": address}})
        return
    with socket.socket() as probe:  # a free port for the dashboard, so its URL is known before it starts
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray.init(
        address="local",
        dashboard_port=port,
        log_to_driver=True,
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
    )


def check_cluster_fits(cfg: TrainJobConfig) -> None:
    """Fail fast instead of hanging when workers (plus a CPU for Ray Data) do not fit the cluster."""
    resources = ray.cluster_resources()
    cpus_needed = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + cfg.data.loader.decode_num_cpus
    if resources.get("CPU", 0.0) < cpus_needed:
        raise ClusterTooSmallError(
            f"the Ray cluster has {resources.get('CPU', 0.0):g} CPUs, the job needs {cpus_needed:g} "
            f"({cfg.scaling.num_workers} workers x {cfg.scaling.cpus_per_worker:g} + "
            f"{cfg.data.loader.decode_num_cpus:g} for data loading)"
        )
    if cfg.scaling.use_gpu and resources.get("GPU", 0.0) < cfg.scaling.num_workers:
        raise ClusterTooSmallError(
            f"scaling.use_gpu with {cfg.scaling.num_workers} workers needs that many GPUs; "
            f"the cluster has {resources.get('GPU', 0.0):g}"
        )
