"""The embedded default dataset on disk: synthetic COCO json + images, converted to train/val shards.

Layout of `root` (default `<repo>/data/synthetic`):
    annotations/instances_{train,val}.json   the generated COCO jsons (the converter's source)
    images/{train,val}/*.png                 the generated images (the converter's source)
    train/, val/                             Parquet shards + _ground_truth.json (what COCO eval reads)
                                             + _validation.json + _meta.json
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

from sd_detr.data.coco import convert_coco_to_shards
from sd_detr.data.config import ConvertConfig, SyntheticConfig
from sd_detr.data.meta import (
    META_FILENAME,
    SCHEMA_VERSION,
    MetaNotFoundError,
    ground_truth_path,
    load_meta,
    write_meta,
)
from sd_detr.data.synthetic import SPLITS, generate_split

logger = logging.getLogger(__name__)

_OWN_ENTRIES = {"annotations", "images", *SPLITS}


class SyntheticDatasetMismatchError(FileExistsError):
    """`root` holds a synthetic dataset generated with other settings."""


def default_synthetic_root() -> Path:
    """`<repo>/data/synthetic` for a source checkout (editable install), else `./data/synthetic`."""
    repo = Path(__file__).resolve().parents[2]
    base = repo if (repo / "pyproject.toml").is_file() else Path.cwd()
    return (base / "data" / "synthetic").resolve()


def _existing_config(root: Path) -> dict | None:
    """The generator config recorded in both split metas, or None when the dataset is incomplete or was
    written by an older shard schema (e.g. without `_ground_truth.json`): such a dataset is regenerated."""
    configs = []
    for split in SPLITS:
        try:
            meta = load_meta(root / split)
        except MetaNotFoundError:
            return None
        if meta.schema_version < SCHEMA_VERSION or not ground_truth_path(root / split).is_file():
            logger.info("%s predates shard schema version %d: it will be regenerated", root / split, SCHEMA_VERSION)
            return None
        configs.append(meta.generator_config)
    return configs[0] if all(c == configs[0] for c in configs) else {}


def _build(staging: Path, cfg: SyntheticConfig, progress: bool) -> None:
    for split in SPLITS:
        annotations = generate_split(staging, split, cfg, progress=progress)
        result = convert_coco_to_shards(
            ConvertConfig(
                annotations=annotations,
                images=staging / "images" / split,
                out=staging / split,
                shard_size_mb=cfg.shard_size_mb,
                strict=True,  # generated data must be clean: any problem is a generator bug
                split=split,
                progress=progress,
                num_threads=2,
            )
        )
        meta = result.meta.model_copy(update={"source": "synthetic", "generator_config": cfg.model_dump(mode="json")})
        write_meta(staging / split, meta)


def ensure_synthetic_dataset(
    root: Path | None = None, cfg: SyntheticConfig | None = None, *, overwrite: bool = False, progress: bool = False
) -> Path:
    """Generate the synthetic dataset at `root` unless it is already complete with the same settings.

    Idempotent and atomic: the data are built in a hidden directory beside `root` and renamed into place;
    concurrent callers (e.g. several Tune trials) end with one complete copy.

    Args:
        root: dataset root (default `default_synthetic_root()`).
        cfg: generator settings (default `SyntheticConfig()`).
        overwrite: replace a dataset at `root` generated with other settings.
    Returns:
        `root` (absolute); shards in `root/train` and `root/val`.
    Raises:
        SyntheticDatasetMismatchError: `root` holds a dataset with other settings and `overwrite` is off.
        FileExistsError: `root` holds files that are not a synthetic dataset.
    """
    root = (root or default_synthetic_root()).resolve()
    cfg = cfg or SyntheticConfig()
    wanted = cfg.model_dump(mode="json")
    existing = _existing_config(root)
    if existing == wanted:
        return root
    if root.exists():
        if existing is not None and not overwrite:
            raise SyntheticDatasetMismatchError(
                f"{root} holds a synthetic dataset generated with {existing}, not {wanted}; pass overwrite "
                "(--overwrite) or choose another root"
            )
        foreign = {p.name for p in root.iterdir()} - _OWN_ENTRIES
        if foreign and not overwrite:
            raise FileExistsError(f"{root} holds other files ({sorted(foreign)}); refusing to generate there")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        logger.info("generating the synthetic dataset in %s", root)
        _build(staging, cfg, progress)
        if _existing_config(root) == wanted:  # a concurrent caller finished first
            return root
        old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
        if root.exists():
            os.replace(root, old)
        try:
            os.replace(staging, root)
        except OSError:
            if _existing_config(root) != wanted:  # not a concurrent caller's identical result
                raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not (root / "val" / META_FILENAME).is_file():
        raise RuntimeError(f"synthetic dataset at {root} is incomplete after generation")
    return root
