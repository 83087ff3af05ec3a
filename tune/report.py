"""What a finished sweep shows: one row per trial, the terminal table, the CSV/markdown tables and the AP heat
map logged on the parent MLflow run, the summary metrics, and the best trial's config as a `pipelines/train.py`
YAML file. Columns and axes follow the sweep's searched keys (:meth:`tune.config.SweepConfig.search_keys`)."""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure

from pipelines.sweep_tracking import EndedTrial, TrialStatus
from sd_detr.names import BEST_VAL_AP, VAL_AP
from tune.config import TIME_ATTR, SearchKey, SweepConfig, build_trial_config, format_value
from tune.trial import trial_run_name

logger = logging.getLogger(__name__)

FINAL_VAL_AP = "final_val_AP"
"""Logged on a trial's run when the sweep closes it: the val AP of its last epoch."""


@dataclass
class TrialRow:
    """One trial's outcome. APs are COCO AP in [0, 1] (NaN when the trial never reported)."""

    trial_id: str
    run_name: str
    params: dict[str, Any]
    status: TrialStatus
    epochs_done: int
    best_val_ap: float
    last_val_ap: float
    best_epoch: int
    error: str | None = None

    def ended(self) -> EndedTrial:
        """This trial as its MLflow run is closed: last val AP and epochs done, logged at its last epoch."""
        final = {FINAL_VAL_AP: self.last_val_ap, TIME_ATTR: float(self.epochs_done)}
        return EndedTrial(self.trial_id, self.run_name, self.status, final, final_step=max(self.epochs_done - 1, 0))


def trial_row(
    sweep_name: str,
    keys: Sequence[SearchKey],
    epochs: int,
    trial_id: str,
    params: dict[str, Any],
    metrics: dict,
    error: Any,
) -> TrialRow:
    """The row of one trial from its Tune config and last result: ``finished`` when it trained all ``epochs``,
    ``stopped`` when ASHA ended it earlier, ``error`` when it raised."""
    epochs_done = int(metrics.get(TIME_ATTR, 0))
    status: TrialStatus = "error" if error is not None else ("finished" if epochs_done >= epochs else "stopped")
    return TrialRow(
        trial_id=trial_id,
        run_name=trial_run_name(sweep_name, trial_id, params, keys),
        params=dict(params),
        status=status,
        epochs_done=epochs_done,
        best_val_ap=float(metrics.get(BEST_VAL_AP, math.nan)),
        last_val_ap=float(metrics.get(VAL_AP, math.nan)),
        best_epoch=int(metrics.get("best_epoch", -1)),
        error=None if error is None else f"{type(error).__name__}: {str(error)[:200]}",
    )


def _ranked(row: TrialRow) -> bool:
    """Whether the trial competes for best: it did not fail and reported a val AP."""
    return row.status != "error" and not math.isnan(row.best_val_ap)


def _rank_key(row: TrialRow) -> tuple[bool, bool, float, str]:
    scored = not math.isnan(row.best_val_ap)
    return (not _ranked(row), not scored, -row.best_val_ap if scored else 0.0, row.trial_id)


def sort_rows(rows: list[TrialRow]) -> list[TrialRow]:
    """Best val AP first (ties in trial order, so a rerun picks the same best), then the failed trials (by the AP
    they reached before failing: they never rank above one that completed), trials without an AP last; the first
    row is :func:`best_row` whenever there is one."""
    return sorted(rows, key=_rank_key)


def best_row(rows: list[TrialRow]) -> TrialRow | None:
    """The trial with the highest val AP (over its epochs) that did not fail (the first on ties), or None."""
    ranked = [r for r in rows if _ranked(r)]
    return min(ranked, key=_rank_key) if ranked else None


def summary_metrics(rows: list[TrialRow], seconds: float) -> dict[str, float]:
    """The parent run's metrics: trial counts (all, per status), the sweep's wall time and the best val AP."""
    counts = {status: sum(r.status == status for r in rows) for status in ("finished", "stopped", "error")}
    metrics = {"trials": float(len(rows)), "sweep_seconds": seconds}
    metrics |= {f"trials_{status}": float(n) for status, n in counts.items()}
    best = best_row(rows)
    if best is not None:
        metrics[BEST_VAL_AP] = best.best_val_ap
    return metrics


def _columns(rows: list[TrialRow], keys: Sequence[SearchKey]) -> list[tuple[str, list[str]]]:
    columns = [
        ("rank", [str(i + 1) for i in range(len(rows))]),
        ("best val AP", [f"{r.best_val_ap:.4f}" for r in rows]),
        ("last val AP", [f"{r.last_val_ap:.4f}" for r in rows]),
    ]
    columns += [(key.label, [format_value(r.params.get(key.path), digits=4) for r in rows]) for key in keys]
    columns += [
        ("epochs", [str(r.epochs_done) for r in rows]),
        ("status", [r.status for r in rows]),
        ("run", [r.run_name for r in rows]),
    ]
    return columns


def format_table(rows: list[TrialRow], keys: Sequence[SearchKey]) -> str:
    """Fixed-width text table of ``rows`` (already sorted), one column per searched key, for the terminal."""
    columns = _columns(rows, keys)
    widths = [max(len(name), *(len(v) for v in values)) for name, values in columns]
    lines = ["  ".join(name.ljust(w) for (name, _), w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for index in range(len(rows)):
        lines.append("  ".join(values[index].ljust(w) for (_, values), w in zip(columns, widths, strict=True)))
    return "\n".join(lines)


def markdown_table(rows: list[TrialRow], keys: Sequence[SearchKey]) -> str:
    """GitHub-markdown table of ``rows`` (logged on the parent run as ``sweep/trials.md``)."""
    columns = _columns(rows, keys)
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(values[i] for _, values in columns) + " |" for i in range(len(rows))]
    return "\n".join(lines) + "\n"


def csv_table(rows: list[TrialRow], keys: Sequence[SearchKey]) -> str:
    """CSV of ``rows`` with full-precision APs and one column per searched config path."""
    paths = [key.path for key in keys]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trial_id", "run_name", *paths, "status", "epochs_done", BEST_VAL_AP, f"last_{VAL_AP}",
                     "best_epoch", "error"])  # fmt: skip
    for r in rows:
        writer.writerow([r.trial_id, r.run_name, *(r.params.get(p) for p in paths), r.status, r.epochs_done,
                         r.best_val_ap, r.last_val_ap, r.best_epoch, r.error or ""])  # fmt: skip
    return buffer.getvalue()


def _axis_values(rows: list[TrialRow], path: str) -> list[Any]:
    """The distinct values of ``path`` over ``rows``, sorted when they compare (lists and dicts may be values)."""
    distinct: list[Any] = []
    for value in (r.params.get(path) for r in rows):
        if value not in distinct:  # by equality: 2 and numpy's int64(2) are one value
            distinct.append(value)
    try:
        return sorted(distinct)
    except TypeError:
        return distinct


def heatmap_png(rows: list[TrialRow], keys: Sequence[SearchKey], path: Path, sweep_name: str) -> Path | None:
    """Best val AP over the first searched key (rows) x the second (columns); a cell holds the best trial with
    those two values (over the other keys and repeats); empty cells were not tried or failed. Writes ``path``
    and returns it, or returns None (and logs why) when the sweep searches fewer than two keys."""
    if len(keys) < 2:
        logger.info("no AP heat map: it needs two searched keys, the sweep searches %s", [k.path for k in keys])
        return None
    row_key, column_key = keys[0], keys[1]
    row_values, column_values = _axis_values(rows, row_key.path), _axis_values(rows, column_key.path)
    grid = [[math.nan] * len(column_values) for _ in row_values]
    for r in rows:
        if r.status == "error" or math.isnan(r.best_val_ap):
            continue
        i, j = row_values.index(r.params.get(row_key.path)), column_values.index(r.params.get(column_key.path))
        grid[i][j] = r.best_val_ap if math.isnan(grid[i][j]) else max(grid[i][j], r.best_val_ap)
    figure = Figure(figsize=(2.4 + 1.1 * len(column_values), 1.6 + 0.5 * len(row_values)), dpi=100)
    axes = figure.subplots()
    top = max((v for line in grid for v in line if not math.isnan(v)), default=0.0)
    image = axes.imshow(grid, cmap="viridis", aspect="auto", origin="lower", vmin=0.0, vmax=max(top, 1e-3))
    axes.set_xticks(range(len(column_values)), [format_value(v) for v in column_values])
    axes.set_yticks(range(len(row_values)), [format_value(v) for v in row_values])
    axes.set_xlabel(_axis_label(column_key))
    axes.set_ylabel(_axis_label(row_key))
    title = f"{sweep_name}: best val AP per ({row_key.label}, {column_key.label})"
    if len(keys) > 2:
        title += f", best over {', '.join(k.label for k in keys[2:])}"
    axes.set_title(title, fontsize=9)
    for i, line in enumerate(grid):
        for j, value in enumerate(line):
            text = "-" if math.isnan(value) else f"{value:.3f}"
            axes.text(j, i, text, ha="center", va="center", color="white", fontsize=8)
    figure.colorbar(image, ax=axes, label="best val AP")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def _axis_label(key: SearchKey) -> str:
    return f"{key.label} ({key.note})" if key.note else key.label


def best_config_yaml(cfg: SweepConfig, params: dict[str, Any], num_classes: int) -> str:
    """A full `pipelines/train.py` config: the sweep's trial config (as the user gave it: relative paths stay
    relative) with the best trial's parameters, the dataset's class count and run name ``<sweep>-best``."""
    job = cfg.job_config_dict()
    job.setdefault("model", {})["num_classes"] = num_classes
    best = build_trial_config(job, params, run_name=f"{cfg.sweep.name}-best")
    header = (
        f"# Best trial of sweep {cfg.sweep.name!r}: "
        + ", ".join(f"{k}={v}" for k, v in params.items())
        + "\n# Long final run: python pipelines/train.py --config <this file> --set optimizer.epochs=<N>\n"
    )
    return header + yaml.safe_dump(best.model_dump(mode="json"), sort_keys=False)
