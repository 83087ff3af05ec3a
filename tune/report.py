"""What a finished sweep shows: one row per trial, the terminal table, the CSV/markdown tables and the AP heat
map logged on the parent MLflow run, and the best trial's config as a `pipelines/train.py` YAML file."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from matplotlib.figure import Figure

from sd_detr.names import BEST_VAL_AP, VAL_AP
from tune.config import ALIGN_PATH, SPLIT_PATH, TIME_ATTR, SweepConfig, build_trial_config
from tune.trial import trial_run_name

TrialStatus = Literal["finished", "stopped", "error"]


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

    @property
    def align_loss_weight(self) -> float:
        return float(self.params[ALIGN_PATH])

    @property
    def query_split(self) -> int:
        return int(self.params[SPLIT_PATH])


def trial_row(
    sweep_name: str, epochs: int, trial_id: str, params: dict[str, Any], metrics: dict, error: Any
) -> TrialRow:
    """The row of one trial from its Tune config and last result: ``finished`` when it trained all ``epochs``,
    ``stopped`` when ASHA ended it earlier, ``error`` when it raised."""
    epochs_done = int(metrics.get(TIME_ATTR, 0))
    status: TrialStatus = "error" if error is not None else ("finished" if epochs_done >= epochs else "stopped")
    return TrialRow(
        trial_id=trial_id,
        run_name=trial_run_name(sweep_name, trial_id, params),
        params=dict(params),
        status=status,
        epochs_done=epochs_done,
        best_val_ap=float(metrics.get(BEST_VAL_AP, math.nan)),
        last_val_ap=float(metrics.get(VAL_AP, math.nan)),
        best_epoch=int(metrics.get("best_epoch", -1)),
        error=None if error is None else f"{type(error).__name__}: {str(error)[:200]}",
    )


def _rank_key(row: TrialRow) -> tuple[bool, float, str]:
    return (math.isnan(row.best_val_ap), -row.best_val_ap if not math.isnan(row.best_val_ap) else 0.0, row.trial_id)


def sort_rows(rows: list[TrialRow]) -> list[TrialRow]:
    """Best val AP first (ties in trial order, so a rerun picks the same best); trials without an AP last."""
    return sorted(rows, key=_rank_key)


def best_row(rows: list[TrialRow]) -> TrialRow | None:
    """The trial with the highest val AP (over its epochs) that did not fail (the first on ties), or None."""
    scored = [r for r in rows if r.status != "error" and not math.isnan(r.best_val_ap)]
    return min(scored, key=_rank_key) if scored else None


def _columns(rows: list[TrialRow]) -> list[tuple[str, list[str]]]:
    extra_keys = sorted({k for r in rows for k in r.params} - {ALIGN_PATH, SPLIT_PATH})
    columns = [
        ("rank", [str(i + 1) for i in range(len(rows))]),
        ("best val AP", [f"{r.best_val_ap:.4f}" for r in rows]),
        ("last val AP", [f"{r.last_val_ap:.4f}" for r in rows]),
        ("align_loss_weight", [f"{r.align_loss_weight:.4g}" for r in rows]),
        ("query_split", [str(r.query_split) for r in rows]),
    ]
    columns += [(key, [str(r.params.get(key)) for r in rows]) for key in extra_keys]
    columns += [
        ("epochs", [str(r.epochs_done) for r in rows]),
        ("status", [r.status for r in rows]),
        ("run", [r.run_name for r in rows]),
    ]
    return columns


def format_table(rows: list[TrialRow]) -> str:
    """Fixed-width text table of ``rows`` (already sorted), for the terminal."""
    columns = _columns(rows)
    widths = [max(len(name), *(len(v) for v in values)) for name, values in columns]
    lines = ["  ".join(name.ljust(w) for (name, _), w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for index in range(len(rows)):
        lines.append("  ".join(values[index].ljust(w) for (_, values), w in zip(columns, widths, strict=True)))
    return "\n".join(lines)


def markdown_table(rows: list[TrialRow]) -> str:
    """GitHub-markdown table of ``rows`` (logged on the parent run as ``sweep/trials.md``)."""
    columns = _columns(rows)
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(values[i] for _, values in columns) + " |" for i in range(len(rows))]
    return "\n".join(lines) + "\n"


def csv_table(rows: list[TrialRow]) -> str:
    """CSV of ``rows`` with full-precision APs and one column per searched config path."""
    keys = [ALIGN_PATH, SPLIT_PATH, *sorted({k for r in rows for k in r.params} - {ALIGN_PATH, SPLIT_PATH})]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trial_id", "run_name", *keys, "status", "epochs_done", BEST_VAL_AP, f"last_{VAL_AP}",
                     "best_epoch", "error"])  # fmt: skip
    for r in rows:
        writer.writerow([r.trial_id, r.run_name, *(r.params.get(k) for k in keys), r.status, r.epochs_done,
                         r.best_val_ap, r.last_val_ap, r.best_epoch, r.error or ""])  # fmt: skip
    return buffer.getvalue()


def heatmap_png(rows: list[TrialRow], path: Path, title: str) -> Path:
    """Best val AP over align_loss_weight (rows) x query_split (columns); a cell holds the best trial with
    those knobs (over extra keys and repeats); empty cells were not tried or failed. Writes ``path``."""
    weights = sorted({r.align_loss_weight for r in rows})
    splits = sorted({r.query_split for r in rows})
    grid = [[math.nan] * len(splits) for _ in weights]
    for r in rows:
        if r.status == "error" or math.isnan(r.best_val_ap):
            continue
        i, j = weights.index(r.align_loss_weight), splits.index(r.query_split)
        grid[i][j] = r.best_val_ap if math.isnan(grid[i][j]) else max(grid[i][j], r.best_val_ap)
    figure = Figure(figsize=(2.4 + 1.1 * len(splits), 1.6 + 0.5 * len(weights)), dpi=100)
    axes = figure.subplots()
    top = max((v for line in grid for v in line if not math.isnan(v)), default=0.0)
    image = axes.imshow(grid, cmap="viridis", aspect="auto", origin="lower", vmin=0.0, vmax=max(top, 1e-3))
    axes.set_xticks(range(len(splits)), [str(s) for s in splits])
    axes.set_yticks(range(len(weights)), [f"{w:.3g}" for w in weights])
    axes.set_xlabel("query_split (first divided decoder layer)")
    axes.set_ylabel("align_loss_weight")
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
