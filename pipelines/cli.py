"""Shared command-line handling: ``--config FILE`` (repeatable) and ``--set key.path=value`` overrides,
validated by pydantic before anything else runs; user errors exit with code 2 and one clear message."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from sd_detr.config import apply_overrides, deep_merge, error_location, read_config_file

ConfigT = TypeVar("ConfigT", bound=BaseModel)

PROJECT_LOGGERS = ("pipelines", "sd_detr", "tune", "benchmarks")
"""The loggers whose lines :func:`configure_logging` shows at the level it is given (other libraries: warnings)."""


class _ConsoleHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.<stream_name>`` is when a line is logged, so a stream
    redirected or captured after set-up still receives the lines."""

    def __init__(self, stream_name: str) -> None:
        self.stream_name = stream_name
        super().__init__()

    @property
    def stream(self) -> TextIO:
        return getattr(sys, self.stream_name)

    @stream.setter
    def stream(self, _value: object) -> None:  # StreamHandler's constructor assigns one; the lookup wins
        pass


def configure_logging(level: int | str = logging.INFO) -> None:
    """Console logging of every entry point: the project's loggers (:data:`PROJECT_LOGGERS`) from ``level`` on,
    lines below WARNING to stdout as the bare message, WARNING and above (any library's) to stderr as
    ``LEVEL: message``. Calling it again replaces what it set up.

    ``configure_logging(logging.WARNING)`` silences the progress and summary lines; a caller who wants them
    elsewhere adds its own handler to the ``pipelines`` logger (or the root logger) after this call.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _ConsoleHandler)]:
        root.removeHandler(handler)
    lines = _ConsoleHandler("stdout")
    lines.addFilter(lambda record: record.levelno < logging.WARNING)
    lines.setFormatter(logging.Formatter("%(message)s"))
    problems = _ConsoleHandler("stderr")
    problems.setLevel(logging.WARNING)
    problems.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root.addHandler(lines)
    root.addHandler(problems)
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(level)


def add_config_arguments(parser: argparse.ArgumentParser, default: Path | Sequence[Path] | None) -> None:
    """Add ``--config`` (repeatable, later files win; ``default``: the file(s) used without it, for the help)
    and ``--set`` (repeatable) to ``parser``."""
    defaults = [default] if isinstance(default, Path) else list(default or [])
    parser.add_argument(
        "--config",
        action="append",
        type=Path,
        help="YAML/JSON config file; repeat to layer files"
        + (f" (default: {' + '.join(str(path) for path in defaults)})" if defaults else ""),
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a field")


def format_validation_error(error: ValidationError) -> str:
    """One line per invalid field: ``field.path: message (got value)`` (the ``model`` section's variant tag,
    which pydantic puts into the location, is left out: ``model.taq``, not ``model.sd_detr.taq``)."""
    lines = []
    for item in error.errors():
        location = error_location(item["loc"]) or "(root)"
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {location}: {item['msg']}{shown}")
    return "invalid config:\n" + "\n".join(lines)


def _parse_problem(error: Exception) -> str:
    """One line saying where and why YAML/JSON text does not parse (PyYAML's messages span several lines)."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        return f"{error.problem or error.context} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(error).split())


def _read_file(path: Path) -> dict[str, Any]:
    """``read_config_file``, with a config file that does not parse reported as ``ValueError`` on one line."""
    try:
        return read_config_file(path)
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ValueError(f"{path} is not valid {kind}: {_parse_problem(error)}") from None


def _apply_set(data: dict[str, Any], override: str) -> dict[str, Any]:
    """One ``--set`` override laid over ``data``, a value that does not parse reported as one ``ValueError`` line."""
    try:
        return apply_overrides(data, [override])
    except yaml.YAMLError as error:
        raise ValueError(f"--set {override!r}: value is not valid YAML: {_parse_problem(error)}") from None


def load_or_exit(
    cls: type[ConfigT],
    paths: Sequence[Path] | None,
    overrides: Sequence[str],
    default: Path | None,
    fields: Mapping[str, Any] | None = None,
) -> ConfigT:
    """Load and validate the config, or print why not and exit with status 2.

    Layers, later winning: the config files (``default`` when none is given), ``fields`` (what a script's own
    flags set, e.g. ``--model``), then the ``key.path=value`` overrides. A file or value that does not parse,
    a missing file and an invalid field all exit 2 with a short message.
    """
    files = list(paths) if paths else ([default] if default is not None else [])
    try:
        data: dict[str, Any] = {}
        for path in files:
            data = deep_merge(data, _read_file(Path(path)))
        data = deep_merge(data, dict(fields or {}))
        data = apply_overrides(data, ())  # a JSON-shaped copy, as sd_detr.config.load_config validates
        for override in overrides:
            data = _apply_set(data, override)
        return cls.model_validate(data)
    except ValidationError as error:
        fail(format_validation_error(error))
    except (FileNotFoundError, ValueError) as error:
        fail(f"invalid config: {error}")
    raise AssertionError("unreachable")


def flag_fields(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The config fields a script's flags set: ``{name: value}`` for each of ``names`` given on the command
    line (``None``, argparse's default for a flag not given, leaves the field to the config files/defaults)."""
    values = vars(args)
    return {name: values[name] for name in names if values.get(name) is not None}


TRAINING_FAILED_EXIT_CODE = 1
"""Exit code of an entry point whose training failed (a worker error past ``training.max_failures``)."""
TRACKING_INCOMPLETE_EXIT_CODE = 3
"""Exit code of an entry point whose training is done but whose tracking is not (metrics unsent, model not
registered, alias not moved): the message says what to rerun; a rerun never registers anything twice."""


def print_error(message: str) -> None:
    """Print ``error: message`` to stderr: the one line an entry point that gives up leaves there (outside
    logging, so silencing the log lines never hides why a command failed)."""
    print(f"error: {message}", file=sys.stderr, flush=True)


def fail(message: str, code: int = 2) -> None:
    """:func:`print_error` ``message`` and exit with ``code``."""
    print_error(message)
    raise SystemExit(code)
