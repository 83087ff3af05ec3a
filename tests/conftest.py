"""Shared fixtures: one local Ray instance per test session, and small datasets built once per session.

`RAY_AUTH_MODE` is read when ray is imported, so it is set here, before any test module imports ray:
the test cluster runs without token auth (Ray 2.60 would otherwise turn it on for a fresh local cluster).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mlflow_server import mlflow_server  # noqa: F401  (one session-wide MLflow server fixture)

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.pop("RAY_ADDRESS", None)  # always a fresh local test cluster, never a user's cluster


@pytest.fixture(scope="session")
def ray_local() -> Iterator[object]:
    """A local Ray with 4 logical CPUs (bookkeeping only: 2 Train workers at 0.5 CPU leave 3 for Ray Data)
    and the dashboard on (Train's placement-group cleaner needs the State API). Shut down at session end.

    Functions defined in test modules that run inside Ray workers need
    `ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])` in that module.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, object_store_memory=512 * 1024**2, log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic dataset (12 train / 6 val images; train split over 2+ shards), built once."""
    from sd_detr.data.builtin import ensure_synthetic_dataset
    from sd_detr.data.config import SyntheticConfig

    cfg = SyntheticConfig(seed=7, num_train=12, num_val=6, shard_size_mb=0.25)
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "data", cfg)


def encode_image(width: int, height: int, fmt: str = "PNG", seed: int = 0) -> bytes:
    """Random-noise RGB image of the given size, encoded as PNG or JPEG."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def write_coco(tmp_path: Path):
    """Factory: write a COCO json + image folder under tmp_path; returns (json path, image folder).

    `images` are COCO image records; an optional `_bytes` key holds the file content (None: no file is
    written, i.e. a missing image; absent: a noise PNG of the record's size).
    """
    import json

    def write(images: list[dict], annotations: list[dict], categories: list[dict], name: str = "coco"):
        root = tmp_path / name
        image_dir = root / "images"
        image_dir.mkdir(parents=True)
        records = []
        for index, image in enumerate(images):
            record = {k: v for k, v in image.items() if k != "_bytes"}
            content = image.get("_bytes", ...)
            if content is ...:
                content = encode_image(int(image["width"]), int(image["height"]), seed=index)
            if content is not None:
                (image_dir / str(image["file_name"])).write_bytes(content)
            records.append(record)
        path = root / "instances.json"
        path.write_text(json.dumps({"images": records, "annotations": annotations, "categories": categories}))
        return path, image_dir

    return write


@pytest.fixture(scope="session")
def corrupt_shard_dir(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """The synthetic val shards rewritten with one row's image bytes replaced by garbage.

    Returns (shard directory, image id of the corrupt row).
    """
    from sd_detr.data.meta import load_meta, write_meta
    from sd_detr.data.shards import ShardWriter, iter_row_groups, read_row_group

    source = synthetic_root / "val"
    meta = load_meta(source)
    out = tmp_path_factory.mktemp("corrupt_shards")
    rows = [row for path, group in iter_row_groups(meta.shard_paths(source)) for row in read_row_group(path, group)]
    corrupt_id = int(rows[2]["image_id"])
    rows[2]["image"] = rows[2]["image"][:40]  # a truncated PNG: the header reads, the pixels do not
    with ShardWriter(out, shard_size_bytes=1 << 30, row_group_rows=4) as writer:
        for row in rows:
            writer.add(row)
    shards = writer.close()
    write_meta(out, meta.model_copy(update={"shards": shards, "annotation_file": str(meta.annotation_path(source))}))
    return out, corrupt_id


# A fixture that brings up a costly resource -> the marker every test using it (directly or through another
# fixture) must carry, so that `-m "not ray and not server"` really leaves that resource out.
COSTLY_FIXTURE_MARKERS = {"ray_local": "ray", "mlflow_server": "server"}
RAY_GROUP = "ray-cluster"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Fail the collection when a test uses `ray_local` or `mlflow_server` without its marker; put every
    `ray` test in the xdist group :data:`RAY_GROUP` (one pytest worker runs them in turn: one local Ray at
    a time on the machine, as the cluster-wide tests expect).

    It neither reorders nor deselects: no test depends on the order the suite runs in.
    """
    for item in items:
        if item.get_closest_marker("ray") is not None:
            item.add_marker(pytest.mark.xdist_group(RAY_GROUP))
    unmarked = [
        f"{item.nodeid} uses {fixture} but is not marked @pytest.mark.{marker}"
        for item in items
        for fixture, marker in COSTLY_FIXTURE_MARKERS.items()
        if fixture in getattr(item, "fixturenames", ()) and item.get_closest_marker(marker) is None
    ]
    if unmarked:
        raise pytest.UsageError("tests without the marker of the resource they start:\n" + "\n".join(unmarked))
