"""Ray connection of the sweep driver, with two guards against resources a stopped trial can leave taken.

When Tune stops a trial (ASHA, Ctrl+C) it kills the trial actor, and with it the Ray Train controller, which
cannot release its workers' placement group. Ray Train 2.60 then relies on a detached cleaner actor that
watches the controller through the State API (Ray issue #54305): ``pipelines.ray_cluster.ensure_ray`` makes sure the
cleaner finds the right cluster, and ``release_orphaned_placement_groups`` frees what the cleaner misses (a
controller killed while it was starting its workers registers no group with the cleaner). Either way a
group left behind keeps its CPUs/GPUs reserved and the next trial would wait for them forever.
"""

from __future__ import annotations

import logging

import ray
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.state import list_jobs, list_placement_groups

from pipelines.ray_cluster import ClusterTooSmallError

logger = logging.getLogger(__name__)

_LIST_LIMIT = 10_000


def check_sweep_fits(cpus_per_trial: float, max_concurrent_trials: int, data_cpus: float) -> None:
    """Fail fast when the running trials' reservations would leave Ray Data no CPU for its decode tasks (the
    trials would then wait forever): ``max_concurrent_trials x cpus_per_trial + data_cpus`` must fit."""
    available = ray.cluster_resources().get("CPU", 0.0)
    needed = max_concurrent_trials * cpus_per_trial + data_cpus
    if available < needed:
        raise ClusterTooSmallError(
            f"the Ray cluster has {available:g} CPUs, the sweep needs {needed:g} ({max_concurrent_trials} concurrent "
            f"trials x {cpus_per_trial:g} (Train workers + sweep.trial_cpus) + {data_cpus:g} for data loading); "
            "lower scaling.cpus_per_worker or sweep.max_concurrent_trials"
        )


def release_orphaned_placement_groups() -> int:
    """Remove the placement groups that outlived the job that created them (non-detached groups whose driver
    has exited, e.g. a sweep stopped by Ctrl+C while a trial was starting its workers). Returns how many.

    Such a group serves nobody: Ray ties a non-detached group's lifetime to its job. Groups of running jobs
    and detached groups are never touched. Needs the State API (``ray[default]``); without it nothing is
    removed.
    """
    address = ray.get_runtime_context().gcs_address
    try:
        ended = {
            job.job_id
            for job in list_jobs(address=address, limit=_LIST_LIMIT)
            if job.type == "DRIVER" and job.job_id and job.status in ("SUCCEEDED", "FAILED", "STOPPED")
        }
        groups = list_placement_groups(address=address, limit=_LIST_LIMIT, detail=True)
    except Exception as error:  # State API unavailable: keep going, the cleaner may still work
        logger.warning("cannot list placement groups (%s: %s)", type(error).__name__, error)
        return 0
    orphans = [
        group
        for group in groups
        if group.state in ("CREATED", "PENDING", "RESCHEDULING")
        and not group.is_detached
        and group.creator_job_id in ended
    ]
    for group in orphans:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group.placement_group_id)))
    if orphans:
        logger.info("Released %d placement group(s) left reserved by finished jobs", len(orphans))
    return len(orphans)
