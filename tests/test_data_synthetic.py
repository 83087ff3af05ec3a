"""The built-in synthetic dataset: deterministic for a seed, varied, and complete on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.prepare_data import main as prepare_main
from sd_detr.data.builtin import SyntheticDatasetMismatchError, ensure_synthetic_dataset
from sd_detr.data.config import SyntheticConfig
from sd_detr.data.meta import GROUND_TRUTH_FILENAME, META_FILENAME, load_ground_truth, load_meta
from sd_detr.data.shards import iter_row_groups, read_row_group
from sd_detr.data.synthetic import CATEGORIES, generate_split
from sd_detr.evaluation import coco_from_dict


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generator_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    cfg = SyntheticConfig(seed=3, num_train=6, num_val=2)
    generate_split(tmp_path / "a", "train", cfg)
    generate_split(tmp_path / "b", "train", cfg)
    first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(first) == 7 and first == second  # 6 PNGs + json, byte for byte
    generate_split(tmp_path / "c", "train", cfg.model_copy(update={"seed": 4}))
    other = _files(tmp_path / "c")
    assert other.keys() == first.keys()
    assert all(other[name] != first[name] for name in first)


def test_generator_output_is_varied_and_consistent(tmp_path: Path) -> None:
    cfg = SyntheticConfig(seed=0, num_train=40, num_val=1, empty_fraction=0.15)
    coco = json.loads(generate_split(tmp_path, "train", cfg).read_text())
    assert coco["categories"] == CATEGORIES
    images = {im["id"]: im for im in coco["images"]}
    assert len(images) == 40
    sizes = {(im["width"], im["height"]) for im in images.values()}
    assert len(sizes) > 20 and all(128 <= s <= 192 for size in sizes for s in size)
    per_image: dict[int, list[dict]] = {i: [] for i in images}
    for ann in coco["annotations"]:
        per_image[ann["image_id"]].append(ann)
        x, y, w, h = ann["bbox"]
        image = images[ann["image_id"]]
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= image["width"] and y + h <= image["height"]
        assert 0 < ann["area"] <= w * h and ann["iscrowd"] == 0
    counts = [len(v) for v in per_image.values()]
    assert 0 in counts and max(counts) <= cfg.max_objects and len(set(counts)) >= 4
    assert {a["category_id"] for a in coco["annotations"]} == {c["id"] for c in CATEGORIES}
    sides = [max(a["bbox"][2], a["bbox"][3]) for a in coco["annotations"]]
    assert min(sides) < 20 and max(sides) > 50
    partially_hidden = [a for a in coco["annotations"] if a["area"] < 0.5 * a["bbox"][2] * a["bbox"][3]]
    assert partially_hidden  # rings, crosses, triangles and occluded objects do not fill their box
    overlaps = sum(
        1
        for anns in per_image.values()
        for i, a in enumerate(anns)
        for b in anns[i + 1 :]
        if min(a["bbox"][0] + a["bbox"][2], b["bbox"][0] + b["bbox"][2]) > max(a["bbox"][0], b["bbox"][0])
        and min(a["bbox"][1] + a["bbox"][3], b["bbox"][1] + b["bbox"][3]) > max(a["bbox"][1], b["bbox"][1])
    )
    assert overlaps >= 3
    for image in list(images.values())[:10]:
        pixels = np.asarray(Image.open(tmp_path / "images" / "train" / image["file_name"]), dtype=np.float32)
        assert pixels.shape == (image["height"], image["width"], 3)
        assert pixels.std(axis=(0, 1)).mean() > 10  # textured, not a flat background
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000


def test_ensure_synthetic_dataset_is_complete_and_idempotent(synthetic_root: Path) -> None:
    train, val = load_meta(synthetic_root / "train"), load_meta(synthetic_root / "val")
    assert (train.counts.images, val.counts.images) == (12, 6)
    assert train.counts.shards >= 2 and train.source == "synthetic" and train.generator_config["seed"] == 7
    assert [c.id for c in val.categories] == [1, 3, 4, 7, 9]
    ground_truth = coco_from_dict(load_ground_truth(synthetic_root / "val"))
    shard_ids = sorted(
        row["image_id"]
        for path, group in iter_row_groups(val.shard_paths(synthetic_root / "val"))
        for row in read_row_group(path, group, columns=["image_id"])
    )
    assert shard_ids == sorted(ground_truth.getImgIds())
    assert val.counts.annotations == len(ground_truth.getAnnIds())
    source_json = json.loads(val.annotation_path(synthetic_root / "val").read_text())  # the generated source
    assert ground_truth.dataset["annotations"] == [
        {k: a[k] for k in ("id", "image_id", "category_id", "bbox", "area", "iscrowd")}
        for a in source_json["annotations"]
    ]  # clean generated data: the ground truth is the source, less nothing
    train_ids = {image["id"] for image in load_ground_truth(synthetic_root / "train")["images"]}
    assert len(train_ids) == 12 and not set(shard_ids) & train_ids  # disjoint splits

    meta_file = synthetic_root / "train" / META_FILENAME
    stamp = meta_file.stat().st_mtime_ns
    cfg = SyntheticConfig(seed=7, num_train=12, num_val=6, shard_size_mb=0.25)
    assert ensure_synthetic_dataset(synthetic_root, cfg) == synthetic_root
    assert meta_file.stat().st_mtime_ns == stamp  # nothing regenerated
    with pytest.raises(SyntheticDatasetMismatchError, match="overwrite"):
        ensure_synthetic_dataset(synthetic_root, cfg.model_copy(update={"num_train": 13}))


def test_synthetic_cli_generates_train_and_val(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "synthetic"
    assert prepare_main(["synthetic", "--out", str(out), "--seed", "1", "--num-train", "3", "--num-val", "2"]) == 0
    assert load_meta(out / "train").counts.images == 3 and load_meta(out / "val").counts.images == 2
    assert (out / "annotations" / "instances_val.json").is_file()
    assert (out / "val" / GROUND_TRUTH_FILENAME).is_file() and (out / "train" / GROUND_TRUTH_FILENAME).is_file()
    assert "val: 2 images" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]  # no staging directory left
