"""The config of `tune/sweep.py`: the trials' :class:`TrainJobConfig` plus a ``sweep`` section (search space,
search kind, ASHA, concurrency, storage). Pure pydantic, validated before Ray starts: every combination of
values the search can give is checked against the trial model (e.g. a ``query_split`` beyond the decoder depth
is an error naming ``sweep.query_split``, and beyond a depth that ``sweep.extra`` searches one naming the
combination).

The two SD-DETR knobs (docs/method.md) map to config paths:
``sweep.align_loss_weight`` -> ``loss.align_loss_weight`` and ``sweep.query_split`` -> ``model.query_split``.
``sweep.extra`` adds grid keys given as dotted config paths (``optimizer.lr: [1e-4, 4e-4]``).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from pipelines.config import RUN_NAME_PATTERN, TrainJobConfig
from sd_detr.config import StrictModel, apply_overrides, error_location
from sd_detr.names import VAL_AP

ALIGN_PATH = "loss.align_loss_weight"
SPLIT_PATH = "model.query_split"
LAYERS_PATH = "model.transformer.num_decoder_layers"
METRIC = VAL_AP
TIME_ATTR = "epochs_done"
"""ASHA's time attribute: epochs completed (1-based), added to every Tune result by the trial."""
RESUME_FIXED_PREFIXES = ("sweep.align_loss_weight.", "sweep.query_split.", "sweep.extra.", "sweep.search",
                         "sweep.num_samples", "sweep.seed", "sweep.asha.", "sweep.max_concurrent_trials",
                         "model.", "matcher.", "loss.", "optimizer.")  # fmt: skip
"""Flattened config keys a resumed sweep must keep: its search space, what defines a trial (model, loss,
recipe), and the scheduler and concurrency that ``Tuner.restore`` takes from the saved experiment whatever
the config says (a changed value would be checked here but not used). Data, scaling, storage and tracking
settings may change."""


@dataclass(frozen=True)
class SearchKey:
    """One searched config path and how trial run names, the tables and the AP heat map show it.

    ``path``: dotted config path set on each trial (``loss.align_loss_weight``); ``label``: table column and
    axis label; ``abbreviation``: prefix of its value in trial run names (``w`` in ``-w0.5``); ``note``: what the
    value means, shown beside the axis label (may be empty).
    """

    path: str
    label: str
    abbreviation: str
    note: str = ""


def format_value(value: Any, digits: int = 3) -> str:
    """A searched value as trial names, tables and axes show it: a float with ``digits`` significant digits,
    anything else as ``str``."""
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _check_grid(values: list, low: object, high: object) -> None:
    """A grid space lists distinct values and no bounds."""
    if not values or low is not None or high is not None:
        raise ValueError("kind=grid takes a non-empty `values` list and no low/high")
    if len(set(values)) != len(values):
        raise ValueError(f"values must be distinct (got {values})")


class FloatSpace(StrictModel):
    """A float search space: ``grid`` values, or ``uniform``/``loguniform`` bounds (random search only)."""

    kind: Literal["grid", "uniform", "loguniform"] = Field("grid", description="How values are chosen.")
    values: list[float] = Field(default_factory=list, description="kind=grid: the values, each tried.")
    low: float | None = Field(None, description="kind=uniform/loguniform: lower bound (inclusive).")
    high: float | None = Field(None, description="kind=uniform/loguniform: upper bound.")

    @model_validator(mode="after")
    def _shape(self) -> FloatSpace:
        if self.kind == "grid":
            _check_grid(self.values, self.low, self.high)
            return self
        if self.values or self.low is None or self.high is None:
            raise ValueError(f"kind={self.kind} takes `low` and `high` and no `values`")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.kind == "loguniform" and self.low <= 0:
            raise ValueError(f"kind=loguniform needs low > 0 (got {self.low})")
        return self

    def candidates(self) -> list[float]:
        """Every grid value, or the two bounds (what validation must accept)."""
        return list(self.values) if self.kind == "grid" else [float(self.low), float(self.high)]


class IntSpace(StrictModel):
    """An integer search space: ``grid`` values, or an inclusive ``range`` low..high."""

    kind: Literal["grid", "range"] = Field("grid", description="Listed values, or every integer low..high.")
    values: list[int] = Field(default_factory=list, description="kind=grid: the values, each tried.")
    low: int | None = Field(None, description="kind=range: first value.")
    high: int | None = Field(None, description="kind=range: last value (inclusive).")

    @model_validator(mode="after")
    def _shape(self) -> IntSpace:
        if self.kind == "grid":
            _check_grid(self.values, self.low, self.high)
            return self
        if self.values or self.low is None or self.high is None:
            raise ValueError("kind=range takes `low` and `high` (inclusive) and no `values`")
        if not self.low <= self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        return self

    def candidates(self) -> list[int]:
        """Every value the space can give."""
        return list(self.values) if self.kind == "grid" else list(range(int(self.low), int(self.high) + 1))


class AshaSection(StrictModel):
    """ASHA early stopping on val AP; times are epochs completed."""

    enabled: bool = Field(True, description="Stop weak trials early (False: every trial runs all epochs).")
    grace_period: int = Field(1, ge=1, description="Epochs every trial trains before it can be stopped.")
    reduction_factor: float = Field(2.0, gt=1.0, description="Keep the best 1/reduction_factor at each rung.")
    max_t: int | None = Field(
        None, ge=1, description="Epoch budget of a trial (default optimizer.epochs: trials run to completion)."
    )


class SweepSection(StrictModel):
    """What is searched, how, and where the sweep lives."""

    name: str = Field(
        "sd-detr-sweep",
        pattern=RUN_NAME_PATTERN,
        description="Tune experiment and MLflow parent run name; rerunning the same name resumes the sweep.",
    )
    align_loss_weight: FloatSpace = Field(
        default_factory=lambda: FloatSpace(kind="grid", values=[0.5, 1.0, 2.0]),
        description="Space of loss.align_loss_weight.",
    )
    query_split: IntSpace = Field(
        default_factory=lambda: IntSpace(kind="grid", values=[0]),
        description="Space of model.query_split (in [0, model.transformer.num_decoder_layers]).",
    )
    extra: dict[str, list[Any]] = Field(
        default_factory=dict, description="More keys: dotted config path -> list of values (grid or choice)."
    )
    search: Literal["grid", "random"] = Field(
        "grid", description="grid: every combination (all spaces must be listable); random: num_samples draws."
    )
    num_samples: int = Field(1, ge=1, description="random: trials; grid: repeats of the whole grid.")
    seed: int = Field(0, description="Seed of the random search (a restarted sweep draws the same trials).")
    max_concurrent_trials: int = Field(1, ge=1, description="Trials running at once.")
    trial_cpus: float = Field(
        0.01, gt=0.0, description="CPUs reserved by each trial's driver actor (the Train workers reserve their own)."
    )
    asha: AshaSection = Field(default_factory=AshaSection)
    storage_path: str | None = Field(
        None,
        description="Tune storage: a local/NFS path or a URI such as s3://bucket/ray_results (default "
        "training.storage_path). The sweep lives in <storage>/<name>.",
    )
    best_config_out: Path | None = Field(
        None,
        description="Where the best trial's train.py config is written (default <storage>/<name>-best.yaml on "
        "local storage, ./<name>-best.yaml with a URI storage). It is also logged on the parent MLflow run.",
    )

    @model_validator(mode="after")
    def _searchable(self) -> SweepSection:
        for key, values in self.extra.items():
            if not values:
                raise ValueError(f"sweep.extra[{key!r}] needs at least one value")
            if key in (ALIGN_PATH, SPLIT_PATH, "training.run_name"):
                raise ValueError(f"sweep.extra[{key!r}]: set this through its own sweep field, not extra")
        if self.search == "grid" and self.align_loss_weight.kind != "grid":
            raise ValueError(
                f"sweep.align_loss_weight.kind={self.align_loss_weight.kind} cannot be enumerated by "
                "sweep.search=grid; give kind=grid with values, or use search=random"
            )
        return self


class SweepConfig(TrainJobConfig):
    """A sweep: the trials' job config (every `pipelines/train.py` section) plus ``sweep``.

    Loaded from the same YAML files as train.py plus a file with the ``sweep`` section
    (``--config configs/default.yaml --config tune/sweep.yaml``).
    """

    sweep: SweepSection = Field(default_factory=SweepSection)

    @model_validator(mode="after")
    def _trials_valid(self) -> SweepConfig:
        if self.model.variant != "sd_detr":
            raise ValueError(
                f"the sweep searches SD-DETR's loss.align_loss_weight and model.query_split, which "
                f"model.variant={self.model.variant} does not have: sweep an sd_detr config (leave model.variant "
                "unset or sd_detr; do not layer configs/variants/conditional_detr.yaml)"
            )
        layers = self.model.transformer.num_decoder_layers
        bad = [v for v in self.sweep.query_split.candidates() if not 0 <= v <= layers]
        if bad and LAYERS_PATH not in self.sweep.extra:
            raise ValueError(
                f"sweep.query_split: values {bad} out of range [0, model.transformer.num_decoder_layers={layers}]"
            )
        epochs = self.optimizer.epochs
        asha = self.sweep.asha
        if asha.max_t is not None and asha.max_t > epochs:
            raise ValueError(f"sweep.asha.max_t ({asha.max_t}) exceeds optimizer.epochs ({epochs})")
        if asha.enabled and asha.grace_period > self.asha_max_t():
            raise ValueError(f"sweep.asha.grace_period ({asha.grace_period}) exceeds max_t ({self.asha_max_t()})")
        self._check_every_trial()
        return self

    def _check_every_trial(self) -> None:
        """Build the trial config of every combination the search can give (float ranges by their bounds): a
        value valid alone can be invalid with another key's value (a query split beyond an ``extra`` decoder
        depth, an ``extra`` variant without the split), and that must fail here, not in a trial on the cluster."""
        spaces = {
            ALIGN_PATH: self.sweep.align_loss_weight.candidates(),
            SPLIT_PATH: self.sweep.query_split.candidates(),
            **self.sweep.extra,
        }
        fields = {ALIGN_PATH: "sweep.align_loss_weight", SPLIT_PATH: "sweep.query_split"}
        base = self.job_config_dict()
        for values in itertools.product(*spaces.values()):
            params = dict(zip(spaces, values, strict=True))
            error = _trial_error(base, params)
            if error is None:
                continue
            # name the one searched key whose value alone breaks the trial, else the whole combination
            alone = [key for key in spaces if _trial_error(base, {key: params[key]}) is not None]
            where = fields.get(alone[0], f"sweep.extra[{alone[0]!r}]") if alone else "sweep (the combination)"
            raise ValueError(f"{where}: {params} gives an invalid trial config: {error}")

    def storage(self) -> str:
        """Where the Tune experiment lives: ``sweep.storage_path`` or ``training.storage_path``, local paths made
        absolute."""
        storage = self.sweep.storage_path or self.training.storage_path
        return storage if "://" in storage else str(Path(storage).resolve())

    def experiment_path(self) -> str:
        """The Tune experiment directory, ``<storage>/<sweep.name>`` (Tuner.restore reads it)."""
        return f"{self.storage().rstrip('/')}/{self.sweep.name}"

    def best_config_path(self) -> Path:
        """Where the best trial's `pipelines/train.py` config is written."""
        if self.sweep.best_config_out is not None:
            return self.sweep.best_config_out.resolve()
        storage = self.storage()
        return (
            Path(f"{self.sweep.name}-best.yaml").resolve()
            if "://" in storage
            else Path(storage) / f"{self.sweep.name}-best.yaml"
        )

    def asha_max_t(self) -> int:
        """ASHA's epoch budget: ``sweep.asha.max_t`` or ``optimizer.epochs``."""
        return self.sweep.asha.max_t or self.optimizer.epochs

    def job_config_dict(self) -> dict[str, Any]:
        """The trials' base job config as JSON data (fields left unset stay unset, e.g. ``model.num_classes``,
        which the dataset then decides)."""
        return self.model_dump(mode="json", exclude={"sweep"}, exclude_unset=True)

    def search_keys(self) -> list[SearchKey]:
        """The searched config paths, in display order: the two SD-DETR knobs, then ``sweep.extra`` by path
        (labelled by path, abbreviated by its last component in run names)."""
        knobs = [
            SearchKey(ALIGN_PATH, "align_loss_weight", "w"),
            SearchKey(SPLIT_PATH, "query_split", "s", "first divided decoder layer"),
        ]
        return knobs + [SearchKey(path, path, path.rsplit(".", 1)[-1]) for path in sorted(self.sweep.extra)]

    def num_trials(self) -> int:
        """How many trials the sweep runs."""
        if self.sweep.search == "random":
            return self.sweep.num_samples
        sizes = [len(self.sweep.align_loss_weight.values), len(self.sweep.query_split.candidates())]
        sizes += [len(v) for v in self.sweep.extra.values()]
        return self.sweep.num_samples * math.prod(sizes)


def build_trial_config(base: dict[str, Any], params: dict[str, Any], run_name: str | None = None) -> TrainJobConfig:
    """The :class:`TrainJobConfig` of one trial: ``base`` (JSON data) with ``params`` (dotted path -> value) set,
    and ``training.run_name`` when given."""
    overrides = [f"{key}={json.dumps(value)}" for key, value in params.items()]
    if run_name is not None:
        overrides.append(f"training.run_name={run_name}")
    return TrainJobConfig.model_validate(apply_overrides(base, overrides))


def _trial_error(base: dict[str, Any], params: dict[str, Any]) -> str | None:
    """The first error of the trial config ``base`` + ``params``, or None when it is valid."""
    try:
        build_trial_config(base, params)
    except (ValidationError, ValueError) as error:
        return _first_error(error)
    return None


def _first_error(error: Exception) -> str:
    if isinstance(error, ValidationError):
        item = error.errors()[0]
        return f"{error_location(item['loc'])}: {item['msg']}"
    return str(error)
