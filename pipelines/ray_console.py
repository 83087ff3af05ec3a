"""Ray's own lines in a training job's console (``training.ray_console``): ``quiet`` drops Ray's routine lines,
``verbose`` shows everything Ray prints. Ray's log files under its session directory are not affected."""

from __future__ import annotations

import logging
import re
from typing import Literal

from ray._private import ray_constants, ray_logging
from ray._private.log import PlainRayHandler

RayConsole = Literal["quiet", "verbose"]

ROUTINE_RAY_LINES = re.compile(
    "|".join(
        [
            r"Checkpoint successfully created at: ",  # Ray Train, every reported checkpoint
            r"Dataset \S+ execution finished in ",  # Ray Data, every dataset pass (train, val per rank)
            r"Progress bars disabled\. To enable, set ",  # Ray Data, once per process (we disable them)
            r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher' .*constructor arguments",
        ]
    )
)
"""Lines of Ray (forwarded from its processes, or logged by Ray Data in this one) that ``quiet`` drops. The
PreemptionWatcher line is logged at ERROR by Ray's core worker whenever Ray Train starts its preemption
watcher, an actor that may restart with its arguments in the object store: a false alarm, not a failure."""


def _shown_on_quiet_console(record: logging.LogRecord) -> bool:
    """Filter of Ray Data's console handler on the driver: warnings and errors, except routine ones."""
    return record.levelno >= logging.WARNING and not ROUTINE_RAY_LINES.search(record.getMessage())


def apply_ray_console(mode: RayConsole) -> None:
    """Set what this process (the job's driver) prints of Ray's lines. ``quiet``: the lines forwarded from
    Ray's processes that match :data:`ROUTINE_RAY_LINES` are dropped (Ray's own log-deduplication skip rule,
    i.e. what ``RAY_DEDUP_LOGS_SKIP_REGEX`` sets, which is kept and extended), and Ray Data's console shows
    only warnings and errors. ``verbose`` restores Ray's behaviour. Idempotent; call it after ``import ray``
    and before the datasets are built. With ``RAY_DEDUP_LOGS=0`` Ray skips no forwarded line."""
    user_rule = ray_constants.RAY_DEDUP_LOGS_SKIP_REGEX
    rules = [rule for rule in (user_rule, ROUTINE_RAY_LINES.pattern if mode == "quiet" else None) if rule]
    skip = re.compile("|".join(f"(?:{rule})" for rule in rules)) if rules else None
    for deduplicator in (ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator):
        deduplicator.skip_re = skip
    for handler in logging.getLogger("ray.data").handlers:
        # only Ray Data's own console handler: a handler someone else put on this logger (a test harness's
        # capture handler, an application's) is not Ray's to filter, and may be shared with other loggers
        if isinstance(handler, PlainRayHandler):
            if mode == "quiet":
                handler.addFilter(_shown_on_quiet_console)
            else:
                handler.removeFilter(_shown_on_quiet_console)
