"""Shared command-line handling: ``--config FILE`` (repeatable) and ``--set key.path=value`` overrides,
validated by pydantic before anything else runs; user errors exit with code 2 and one clear message."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from sd_detr.config import error_location, load_config

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def add_config_arguments(parser: argparse.ArgumentParser, default: Path | None) -> None:
    """Add ``--config`` (repeatable, later files win) and ``--set`` (repeatable) to ``parser``."""
    parser.add_argument(
        "--config",
        action="append",
        type=Path,
        help=f"YAML/JSON config file; repeat to layer files (default: {default})",
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


def load_or_exit(
    cls: type[ConfigT], paths: Sequence[Path] | None, overrides: Sequence[str], default: Path | None
) -> ConfigT:
    """Load and validate the config, or print why not and exit with status 2."""
    files = list(paths) if paths else ([default] if default is not None else [])
    try:
        return load_config(cls, files, overrides)
    except ValidationError as error:
        fail(format_validation_error(error))
    except (FileNotFoundError, ValueError) as error:
        fail(f"invalid config: {error}")
    raise AssertionError("unreachable")


def fail(message: str, code: int = 2) -> None:
    """Print ``message`` to stderr and exit with ``code``."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)
