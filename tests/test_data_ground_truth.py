"""The cleaned COCO ground truth travels with the shards: filled-in fields, evaluation without the source."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipelines.prepare_data import main as prepare_main
from sd_detr.data.builtin import ensure_synthetic_dataset
from sd_detr.data.config import AugmentationConfig, LoaderConfig, SyntheticConfig
from sd_detr.data.dataset import build_dataloader
from sd_detr.data.meta import (
    GROUND_TRUTH_FILENAME,
    META_FILENAME,
    GroundTruthNotFoundError,
    ground_truth_path,
    load_ground_truth,
    load_meta,
)
from sd_detr.data.validation import Issue, ValidationReport
from sd_detr.evaluation import CocoEvaluator, coco_from_dict

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = [{"id": 3, "name": "car"}, {"id": 1, "name": "person", "supercategory": "human"}]


def _third_party_corpus() -> tuple[list[dict], list[dict]]:
    """Four images; annotations without `iscrowd`, `area` or `id` (as many exporters write them)."""
    images = [
        {"id": 10, "file_name": "a.png", "width": 120, "height": 90},
        {"id": 11, "file_name": "b.png", "width": 80, "height": 100},
        {"id": 12, "file_name": "c.png", "width": 64, "height": 64},
        {"id": 13, "file_name": "empty.png", "width": 50, "height": 70},
    ]
    boxes = [(10, [5.0, 6.0, 40.0, 30.0], 1), (10, [60.0, 20.0, 50.0, 60.0], 3), (11, [0.0, 0.0, 80.0, 50.5], 3)]
    boxes += [(11, [30.0, 60.0, 20.0, 30.0], 1), (12, [8.0, 8.0, 16.0, 16.0], 1), (12, [40.0, 30.0, 20.0, 30.0], 3)]
    annotations = [{"image_id": i, "bbox": b, "category_id": c} for i, b, c in boxes]
    return images, annotations


def _convert_cli(json_path: Path, image_dir: Path, out: Path) -> int:
    return prepare_main(["coco", "--annotations", str(json_path), "--images", str(image_dir), "--out", str(out)])


def _perfect_detections(out: Path) -> tuple[list[int], list[dict[str, torch.Tensor]]]:
    """Detections equal to the shards' training targets, mapped back to original pixels and category ids."""
    meta = load_meta(out)
    aug = AugmentationConfig(eval_size=96, eval_max_size=160)
    image_ids, detections = [], []
    for batch in build_dataloader(out, aug, LoaderConfig(batch_size=3, shuffle="none"), train=False):
        for target in batch.targets:
            height, width = target["orig_size"].tolist()
            cx, cy, w, h = (target["boxes"] * torch.tensor([width, height, width, height])).unbind(-1)
            boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
            labels = meta.label_to_category_id(target["labels"])
            detections.append({"boxes": boxes, "labels": labels, "scores": torch.ones(len(boxes))})
            image_ids.append(int(target["image_id"]))
    return image_ids, detections


def test_json_without_iscrowd_area_and_ids_converts_and_evaluates_without_its_source(
    write_coco, tmp_path: Path
) -> None:
    images, annotations = _third_party_corpus()
    json_path, image_dir = write_coco(images, annotations, CATEGORIES, name="source")
    out = tmp_path / "shards" / "val"
    assert _convert_cli(json_path, image_dir, out) == 0

    report = ValidationReport.model_validate_json((out / "_validation.json").read_text())
    n = len(annotations)
    assert report.count(Issue.ISCROWD_MISSING) == report.count(Issue.AREA_FROM_BOX) == n
    assert report.count(Issue.ANNOTATION_ID_ASSIGNED) == n
    assert report.ok  # filled-in fields are counted, not problems

    shutil.rmtree(tmp_path / "source")  # the json and the image folder are gone
    assert not json_path.exists() and not image_dir.exists()

    ground_truth = load_ground_truth(out)
    assert [im["id"] for im in ground_truth["images"]] == [10, 11, 12, 13]  # the empty image is kept too
    assert ground_truth["categories"] == [
        {"id": 1, "name": "person", "supercategory": "human"},
        {"id": 3, "name": "car", "supercategory": ""},
    ]
    gt_annotations = ground_truth["annotations"]
    assert sorted(a["id"] for a in gt_annotations) == list(range(1, n + 1))
    for source, cleaned in zip(annotations, gt_annotations, strict=True):
        assert cleaned["bbox"] == source["bbox"] and cleaned["iscrowd"] == 0
        assert cleaned["area"] == pytest.approx(source["bbox"][2] * source["bbox"][3])

    evaluator = CocoEvaluator(coco_from_dict(ground_truth))
    evaluator.update(*_perfect_detections(out))
    stats = evaluator.summarize()
    assert stats["AP"] == pytest.approx(1.0) and stats["AR100"] == pytest.approx(1.0)

    image_ids, detections = _perfect_detections(out)  # half the boxes found: recall 0.5
    halved = [{k: v[: len(d["boxes"]) // 2] for k, v in d.items()} for d in detections]
    evaluator = CocoEvaluator(coco_from_dict(ground_truth))
    evaluator.update(image_ids, halved)
    assert evaluator.summarize()["AR100"] == pytest.approx(0.5, abs=0.1)


def test_ground_truth_is_exactly_the_shards(write_coco, tmp_path: Path) -> None:
    """Skipped images and annotations are not in it; boxes are the shards' (clipped) boxes; crowd is kept."""
    images = [
        {"id": 1, "file_name": "ok.png", "width": 100, "height": 80},
        {"id": 2, "file_name": "missing.png", "width": 50, "height": 50, "_bytes": None},
        {"id": 3, "file_name": "ok2.png", "width": 60, "height": 60},
    ]
    annotations = [
        {"id": 7, "image_id": 1, "category_id": 1, "bbox": [90.0, 10.0, 30.0, 20.0], "area": 300.0, "iscrowd": 0},
        {"id": 7, "image_id": 3, "category_id": 3, "bbox": [1.0, 1.0, 10.0, 10.0], "iscrowd": 1, "area": 50.0},
        {"id": 0, "image_id": 3, "category_id": 1, "bbox": [5.0, 5.0, 10.0, 10.0], "area": 0, "iscrowd": 0},
        {"id": "x", "image_id": 3, "category_id": 1, "bbox": [20.0, 5.0, 10.0, 10.0], "area": 80.0, "iscrowd": 0},
        {"id": 8, "image_id": 2, "category_id": 1, "bbox": [1.0, 1.0, 5.0, 5.0], "area": 25.0, "iscrowd": 0},
        {"id": 9, "image_id": 1, "category_id": 99, "bbox": [1.0, 1.0, 5.0, 5.0], "area": 25.0, "iscrowd": 0},
    ]
    json_path, image_dir = write_coco(images, annotations, CATEGORIES)
    out = tmp_path / "out"
    assert prepare_main(["coco", "--annotations", str(json_path), "--images", str(image_dir), "--out", str(out)]) == 0
    ground_truth = load_ground_truth(out)
    rows = {r["image_id"]: r for r in pq.read_table(load_meta(out).shard_paths(out)).to_pylist()}
    assert sorted(im["id"] for im in ground_truth["images"]) == sorted(rows) == [1, 3]
    by_image: dict[int, list[dict]] = {}
    for annotation in ground_truth["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    for image_id, row in rows.items():
        cleaned = by_image.get(image_id, [])
        assert [v for a in cleaned for v in a["bbox"]] == pytest.approx(row["boxes"])
        assert [a["iscrowd"] for a in cleaned] == row["iscrowd"]
        assert [a["category_id"] for a in cleaned] == row["category_ids"]
    ids = [a["id"] for a in ground_truth["annotations"]]
    assert ids[0] == 7 and len(set(ids)) == len(ids) and min(ids) >= 1  # first 7 kept; 7, 0, "x" renumbered
    assert by_image[1][0]["bbox"] == [90.0, 10.0, 10.0, 20.0]  # clipped to the image, as in the shards
    assert by_image[3][1]["area"] == 100.0  # area 0 replaced by the box area
    report = ValidationReport.model_validate_json((out / "_validation.json").read_text())
    assert report.count(Issue.ANNOTATION_ID_ASSIGNED) == 3 and report.count(Issue.AREA_FROM_BOX) == 1
    assert report.examples[Issue.ANNOTATION_ID_ASSIGNED.value] == sorted(ids[1:])
    meta = load_meta(out)
    assert (meta.counts.images, meta.counts.annotations) == (2, 4)


def test_old_shard_directory_explains_how_to_reconvert(write_coco, tmp_path: Path) -> None:
    images, annotations = _third_party_corpus()
    json_path, image_dir = write_coco(images, annotations, CATEGORIES)
    out = tmp_path / "old shards"  # a space: the printed command must be quoted for the shell
    assert _convert_cli(json_path, image_dir, out) == 0
    ground_truth_path(out).unlink()  # what a schema-1 conversion wrote: no ground truth, version 1
    meta = json.loads((out / META_FILENAME).read_text())
    (out / META_FILENAME).write_text(json.dumps({**meta, "schema_version": 1}))

    with pytest.raises(GroundTruthNotFoundError, match="schema version 1") as raised:
        load_ground_truth(out)
    assert isinstance(raised.value, FileNotFoundError)
    command = str(raised.value).split("Re-convert with: ")[1]
    assert command.startswith("python pipelines/prepare_data.py coco --annotations ")
    assert str(json_path.resolve()) in command and str(image_dir.resolve()) in command
    argv = shlex.split(command)
    result = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(load_ground_truth(out)["annotations"]) == len(annotations)


def test_damaged_ground_truth_is_refused(write_coco, tmp_path: Path) -> None:
    images, annotations = _third_party_corpus()
    json_path, image_dir = write_coco(images, annotations, CATEGORIES)
    out = tmp_path / "shards"
    assert _convert_cli(json_path, image_dir, out) == 0
    ground_truth = json.loads(ground_truth_path(out).read_text())
    ground_truth["annotations"] = ground_truth["annotations"][1:]
    ground_truth_path(out).write_text(json.dumps(ground_truth))
    with pytest.raises(ValueError, match="damaged"):
        load_ground_truth(out)
    ground_truth_path(out).unlink()
    with pytest.raises(GroundTruthNotFoundError, match="missing"):
        load_ground_truth(out)


def test_synthetic_dataset_without_ground_truth_is_regenerated(tmp_path: Path) -> None:
    cfg = SyntheticConfig(seed=2, num_train=2, num_val=2)
    root = ensure_synthetic_dataset(tmp_path / "synthetic", cfg)
    ground_truth = load_ground_truth(root / "val")
    assert len(ground_truth["images"]) == 2 and load_meta(root / "val").source == "synthetic"
    for split in ("train", "val"):  # downgrade to what the previous schema wrote
        ground_truth_path(root / split).unlink()
        meta = json.loads((root / split / META_FILENAME).read_text())
        (root / split / META_FILENAME).write_text(json.dumps({**meta, "schema_version": 1}))
    with pytest.raises(GroundTruthNotFoundError, match=r"prepare_data\.py synthetic --out .* --seed 2"):
        load_ground_truth(root / "val")
    assert ensure_synthetic_dataset(root, cfg) == root
    assert load_ground_truth(root / "val") == ground_truth
    assert (root / "train" / GROUND_TRUTH_FILENAME).is_file()
