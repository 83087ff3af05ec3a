"""Prepare detection data as Parquet shards.

    python pipelines/prepare_data.py coco --annotations A.json --images DIR --out DIR \
        [--shard-size-mb 256] [--min-kept-fraction 0.5] [--strict] [--overwrite]
    python pipelines/prepare_data.py synthetic [--out data/synthetic] [--seed 0 --num-train N --num-val N]
        [--overwrite]

Exit codes: 0 done; 1 nothing written because of the data: `--strict` found problems, or no image / fewer
than `--min-kept-fraction` of the json's images could be kept (report printed and saved beside `--out`, with
a hint naming the first missing files and the folder searched); 2 invalid arguments or paths, an output
directory that already holds data, or another conversion into the same `--out` still running (its pid and
host are named).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ValidationError

from pipelines.cli import configure_logging, print_error
from sd_detr.data.builtin import default_synthetic_root, ensure_synthetic_dataset
from sd_detr.data.coco import CocoFormatError, StrictValidationError, TooFewImagesError, convert_coco_to_shards
from sd_detr.data.config import ConvertConfig, SyntheticConfig
from sd_detr.data.lock import LockHeldError
from sd_detr.data.meta import GROUND_TRUTH_FILENAME, VALIDATION_FILENAME, load_meta

logger = logging.getLogger("pipelines.prepare_data")  # by name: run as a script, __name__ is "__main__"

EXIT_PROBLEMS = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prepare_data.py", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    coco = commands.add_parser("coco", help="COCO instances json + image folder -> Parquet shards")
    coco.add_argument("--annotations", type=Path, required=True, help="COCO instances json")
    coco.add_argument("--images", type=Path, required=True, help="folder the json's file_names are relative to")
    coco.add_argument("--out", type=Path, required=True, help="output shard directory (parents are created)")
    coco.add_argument("--shard-size-mb", type=float, dest="shard_size_mb", help="target shard size (default 256)")
    coco.add_argument(
        "--min-kept-fraction",
        type=float,
        dest="min_kept_fraction",
        help="exit 1, writing nothing, when fewer than this share of the json's images is kept (default 0.5)",
    )
    coco.add_argument("--strict", action="store_true", default=None, help="exit 1 on any repaired/skipped record")
    coco.add_argument("--overwrite", action="store_true", default=None, help="replace an existing shard directory")
    synthetic = commands.add_parser("synthetic", help="generate the built-in synthetic dataset (+ shards)")
    synthetic.add_argument("--out", type=Path, default=None, help="dataset root (default <repo>/data/synthetic)")
    synthetic.add_argument("--seed", type=int, help="generator seed (default 0)")
    synthetic.add_argument("--num-train", type=int, dest="num_train", help="train images (default 400)")
    synthetic.add_argument("--num-val", type=int, dest="num_val", help="val images (default 100)")
    synthetic.add_argument("--overwrite", action="store_true", help="replace a dataset made with other settings")
    return parser


def _config(model: type[BaseModel], args: argparse.Namespace, fields: Sequence[str]) -> BaseModel:
    """Build `model` from the arguments that were given; pydantic supplies every default."""
    return model(**{name: getattr(args, name) for name in fields if getattr(args, name) is not None})


def _one_line(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in error.errors())


def _run_coco(args: argparse.Namespace) -> int:
    fields = ["annotations", "images", "out", "shard_size_mb", "min_kept_fraction", "strict", "overwrite"]
    cfg = _config(ConvertConfig, args, fields)
    try:
        result = convert_coco_to_shards(cfg)
    except TooFewImagesError as error:
        logger.info(error.report.format())
        print_error(str(error))
        return EXIT_PROBLEMS
    except StrictValidationError as error:
        logger.info(error.report.format())
        logger.info(
            "strict mode: %d problem(s), nothing written; report saved to %s",
            error.report.num_problems,
            error.report_path,
        )
        return EXIT_PROBLEMS
    logger.info(result.report.format())
    logger.info(
        f"wrote {result.meta.counts.images} images, {result.meta.counts.annotations} annotations in "
        f"{result.meta.counts.shards} shard(s) to {result.out_dir}; report: {result.out_dir / VALIDATION_FILENAME}; "
        f"evaluation ground truth: {result.out_dir / GROUND_TRUTH_FILENAME}"
    )
    return 0


def _run_synthetic(args: argparse.Namespace) -> int:
    cfg = _config(SyntheticConfig, args, ["seed", "num_train", "num_val"])
    root = ensure_synthetic_dataset(args.out or default_synthetic_root(), cfg, overwrite=args.overwrite, progress=True)
    for split in ("train", "val"):
        counts = load_meta(root / split).counts
        logger.info(
            f"{split}: {counts.images} images, {counts.annotations} annotations, {counts.shards} shard(s) in {root / split}"
        )
    logger.info("COCO ground truth (what evaluation reads): %s", root / "val" / GROUND_TRUTH_FILENAME)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    configure_logging()
    try:
        return _run_coco(args) if args.command == "coco" else _run_synthetic(args)
    except ValidationError as error:
        print_error(_one_line(error))
    except (FileExistsError, CocoFormatError, UnicodeDecodeError, LockHeldError, NotADirectoryError) as error:
        print_error(str(error))
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
