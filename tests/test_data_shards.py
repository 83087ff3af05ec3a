"""COCO json -> Parquet shards -> batches: exact boxes, size-bounded atomic shards, the bad-input report."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.prepare_data import main as prepare_main
from sd_detr.data.coco import DatasetExistsError, StrictValidationError, convert_coco_to_shards
from sd_detr.data.config import AugmentationConfig, ConvertConfig, LoaderConfig
from sd_detr.data.dataset import build_dataloader
from sd_detr.data.meta import META_FILENAME, VALIDATION_FILENAME, MetaNotFoundError, load_meta
from sd_detr.data.records import CocoFormatError
from sd_detr.data.shards import SHARD_SCHEMA, ShardWriter
from sd_detr.data.validation import Issue, ValidationReport
from tests.conftest import encode_image

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = [
    {"id": 11, "name": "kite", "supercategory": "toy"},
    {"id": 2, "name": "bird", "supercategory": "animal"},
    {"id": 5, "name": "cat", "supercategory": "animal"},
]


def _clean_corpus() -> tuple[list[dict], list[dict]]:
    """Five images (PNG and JPEG, varied sizes, one without objects) with fractional boxes and a crowd box."""
    images = [
        {"id": 101, "file_name": "a.png", "width": 160, "height": 120},
        {"id": 7, "file_name": "b.jpg", "width": 90, "height": 140, "_bytes": encode_image(90, 140, "JPEG", 1)},
        {"id": 55, "file_name": "c.png", "width": 200, "height": 64},
        {"id": 3, "file_name": "empty.png", "width": 100, "height": 100},
        {"id": 900, "file_name": "d.png", "width": 128, "height": 128},
    ]
    annotations = [
        {"id": 1, "image_id": 101, "category_id": 2, "bbox": [10.25, 20.5, 30.75, 40.125], "area": 900.0},
        {"id": 2, "image_id": 101, "category_id": 11, "bbox": [100.0, 0.0, 60.0, 120.0], "area": 7000.0},
        {"id": 3, "image_id": 7, "category_id": 5, "bbox": [0.5, 1.5, 88.0, 137.25], "area": 12000.0},
        {"id": 4, "image_id": 7, "category_id": 2, "bbox": [40.0, 40.0, 5.5, 3.25], "area": 17.0},
        {"id": 5, "image_id": 55, "category_id": 11, "bbox": [150.125, 10.0, 49.875, 50.0], "area": 2400.0},
        {"id": 6, "image_id": 55, "category_id": 5, "bbox": [0.0, 0.0, 20.0, 64.0], "area": 1280.0, "iscrowd": 1},
        {"id": 7, "image_id": 900, "category_id": 5, "bbox": [64.0, 64.0, 64.0, 64.0], "area": 4096.0},
    ]
    return images, annotations


def _convert(json_path: Path, image_dir: Path, out: Path, **overrides) -> ConvertConfig:
    cfg = ConvertConfig(annotations=json_path, images=image_dir, out=out, progress=False, **overrides)
    convert_coco_to_shards(cfg)
    return cfg


def test_round_trip_preserves_every_valid_box(write_coco, tmp_path: Path) -> None:
    images, annotations = _clean_corpus()
    json_path, image_dir = write_coco(images, annotations, CATEGORIES)
    out = tmp_path / "shards"
    _convert(json_path, image_dir, out, row_group_rows=2)

    meta = load_meta(out)
    assert [c.id for c in meta.categories] == [2, 5, 11]
    assert (meta.counts.images, meta.counts.annotations, meta.counts.crowd_annotations) == (5, 7, 1)
    assert meta.annotation_path(out) == json_path.resolve()

    table = pq.read_table(meta.shard_paths(out))
    assert table.schema.remove_metadata() == SHARD_SCHEMA
    rows = {row["image_id"]: row for row in table.to_pylist()}
    for image in images:
        anns = [a for a in annotations if a["image_id"] == image["id"]]
        row = rows[image["id"]]
        assert (row["width"], row["height"], row["file_name"]) == (image["width"], image["height"], image["file_name"])
        assert row["image"] == (image_dir / image["file_name"]).read_bytes()  # kept encoded, byte for byte
        expected = np.asarray([a["bbox"] for a in anns], dtype=np.float32).reshape(-1)
        np.testing.assert_array_equal(np.asarray(row["boxes"], dtype=np.float32), expected)
        assert row["category_ids"] == [a["category_id"] for a in anns]
        assert row["iscrowd"] == [a.get("iscrowd", 0) for a in anns]

    aug = AugmentationConfig(eval_size=96, eval_max_size=160)
    batches = list(build_dataloader(out, aug, LoaderConfig(batch_size=2), train=False))
    targets = {int(t["image_id"]): t for batch in batches for t in batch.targets}
    assert sorted(targets) == sorted(rows)
    for image in images:
        target = targets[image["id"]]
        height, width = image["height"], image["width"]
        assert target["orig_size"].tolist() == [height, width]
        out_h, out_w = target["size"].tolist()
        assert min(out_h, out_w) == 96 or max(out_h, out_w) == 160
        valid = [a for a in annotations if a["image_id"] == image["id"] and not a.get("iscrowd")]
        boxes = target["boxes"]
        assert boxes.dtype == torch.float32 and boxes.shape == (len(valid), 4)
        xywh = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, 2:]], dim=1) * torch.tensor(
            [width, height, width, height]
        )
        torch.testing.assert_close(xywh, torch.tensor([a["bbox"] for a in valid]).reshape(-1, 4), atol=1e-3, rtol=0)
        category_ids = meta.label_to_category_id(target["labels"])
        assert category_ids.tolist() == [a["category_id"] for a in valid]
        assert target["labels"].dtype == torch.int64


def test_shards_are_size_bounded_and_hold_every_row_once(write_coco, tmp_path: Path) -> None:
    images = [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 64} for i in range(1, 13)]
    json_path, image_dir = write_coco(images, [], CATEGORIES)
    image_bytes = len((image_dir / "1.png").read_bytes())  # ~12 KB of incompressible noise
    limit_mb = 3.5 * image_bytes / 2**20
    out = tmp_path / "shards"
    _convert(json_path, image_dir, out, shard_size_mb=limit_mb, row_group_rows=2)
    meta = load_meta(out)
    assert meta.counts.shards == len(meta.shards) >= 4
    assert sorted(p.name for p in out.glob("*.parquet")) == meta.shards
    ids = []
    for path in meta.shard_paths(out):
        table = pq.read_table(path)
        assert 1 <= table.num_rows <= 3
        ids += table.column("image_id").to_pylist()
    assert ids == list(range(1, 13))  # json order, no duplicates, nothing lost


def test_failed_conversion_leaves_no_dataset(write_coco, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, annotations = _clean_corpus()
    json_path, image_dir = write_coco(images, annotations, CATEGORIES)
    calls = []

    def failing_add(self, row):
        calls.append(row["image_id"])
        if len(calls) == 3:
            raise OSError("disk full")

    monkeypatch.setattr(ShardWriter, "add", failing_add)
    out = tmp_path / "shards"
    with pytest.raises(OSError, match="disk full"):
        _convert(json_path, image_dir, out, row_group_rows=1)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # temp dir removed


def test_existing_dataset_needs_overwrite(write_coco, tmp_path: Path) -> None:
    images, annotations = _clean_corpus()
    json_path, image_dir = write_coco(images, annotations, CATEGORIES)
    out = tmp_path / "shards"
    _convert(json_path, image_dir, out)
    first = (out / META_FILENAME).read_text()
    with pytest.raises(DatasetExistsError, match="overwrite"):
        _convert(json_path, image_dir, out)
    _convert(json_path, image_dir, out, overwrite=True, shard_size_mb=0.01)
    assert load_meta(out).counts.shards > 1
    assert (out / META_FILENAME).read_text() != first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _bad_corpus() -> tuple[list[dict], list[dict]]:
    png = encode_image(60, 40)
    images = [
        {"id": 1, "file_name": "ok.png", "width": 160, "height": 120},
        {"id": 2, "file_name": "missing.png", "width": 50, "height": 50, "_bytes": None},
        {"id": 3, "file_name": "garbage.png", "width": 50, "height": 50, "_bytes": b"not an image at all"},
        {"id": 4, "file_name": "truncated.png", "width": 60, "height": 40, "_bytes": png[: len(png) // 2]},
        {"id": 5, "file_name": "wrong_size.png", "width": 50, "height": 40, "_bytes": png},
        {"id": 1, "file_name": "duplicate.png", "width": 80, "height": 80},
        {"id": "x", "file_name": "bad_record.png", "width": 10, "height": 10},
        {"id": 6, "file_name": "ok.jpg", "width": 90, "height": 70, "_bytes": encode_image(90, 70, "JPEG")},
        {"id": 8, "file_name": "empty_file.png", "width": 10, "height": 10, "_bytes": b""},
    ]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 2, "bbox": [10, 10, 20, 20], "area": 400},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [10, 10, 0, 20]},
        {"id": 3, "image_id": 1, "category_id": 5, "bbox": [10, 10, 20, -3]},
        {"id": 4, "image_id": 1, "category_id": 5, "bbox": [150, -5, 30, 25], "area": 100},
        {"id": 5, "image_id": 1, "category_id": 5, "bbox": [170, 10, 20, 20]},
        {"id": 6, "image_id": 1, "category_id": 99, "bbox": [10, 10, 20, 20]},
        {"id": 7, "image_id": 999, "category_id": 2, "bbox": [10, 10, 20, 20]},
        {"id": 8, "image_id": 2, "category_id": 2, "bbox": [1, 1, 5, 5]},
        {"id": 9, "image_id": 3, "category_id": 2, "bbox": [1, 1, 5, 5]},
        {"id": 10, "image_id": 3, "category_id": 11, "bbox": [2, 2, 5, 5]},
        {"id": 11, "image_id": 6, "category_id": 11, "bbox": [0, 0, 30, 30], "iscrowd": 1, "area": 500},
        {"id": 12, "image_id": 6, "category_id": 2, "bbox": ["abc", 0, 1, 1]},
        {"id": 13, "image_id": 6, "category_id": 2, "bbox": [1, 1, math.nan, 4]},
    ]
    return images, annotations


EXPECTED_COUNTS = {
    Issue.MISSING_IMAGE_FILE: 1,
    Issue.CORRUPT_IMAGE: 3,  # garbage, truncated, empty file
    Issue.IMAGE_SIZE_MISMATCH: 1,
    Issue.DUPLICATE_IMAGE_ID: 1,
    Issue.INVALID_IMAGE_RECORD: 1,
    Issue.BOX_NON_POSITIVE_SIZE: 3,  # w = 0, h < 0, w = nan
    Issue.BOX_CLIPPED: 1,
    Issue.BOX_OUTSIDE_IMAGE: 1,
    Issue.UNKNOWN_CATEGORY: 1,
    Issue.ANNOTATION_UNKNOWN_IMAGE: 1,
    Issue.ANNOTATION_OF_SKIPPED_IMAGE: 3,  # 1 of the missing image, 2 of the garbage one
    Issue.INVALID_ANNOTATION_RECORD: 1,
    Issue.CROWD_ANNOTATION: 1,
    Issue.ISCROWD_MISSING: 2,  # kept annotations 1 and 4 (counted for kept images only)
}


def test_bad_input_report_counts_and_repairs(write_coco, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    images, annotations = _bad_corpus()
    json_path, image_dir = write_coco(images, annotations, CATEGORIES)
    out = tmp_path / "shards"
    with caplog.at_level(logging.WARNING):
        cfg = ConvertConfig(annotations=json_path, images=image_dir, out=out, progress=False, min_kept_fraction=0.2)
        result = convert_coco_to_shards(cfg)
    report = result.report
    assert {Issue(k): v for k, v in report.counts.items()} == EXPECTED_COUNTS
    assert report.num_problems == sum(EXPECTED_COUNTS.values()) - 3  # crowd and filled iscrowd: not problems
    assert report.examples[Issue.BOX_NON_POSITIVE_SIZE.value] == [2, 3, 13]
    assert report.examples[Issue.CORRUPT_IMAGE.value] == [3, 4, 8]
    assert report.examples[Issue.ANNOTATION_OF_SKIPPED_IMAGE.value] == [2, 3]  # image ids
    assert (report.images_in, report.images_out, report.annotations_in, report.annotations_out) == (9, 2, 13, 3)
    assert "missing.png" in caplog.text and "garbage.png" in caplog.text

    saved = ValidationReport.model_validate_json((out / VALIDATION_FILENAME).read_text())
    assert saved == report
    rows = {r["image_id"]: r for r in pq.read_table(load_meta(out).shard_paths(out)).to_pylist()}
    assert sorted(rows) == [1, 6]
    assert rows[1]["file_name"] == "ok.png"  # the first record of the duplicated id wins
    np.testing.assert_array_equal(rows[1]["boxes"], [10, 10, 20, 20, 150, 0, 10, 20])  # 2nd box clipped
    assert rows[6]["iscrowd"] == [1]
    text = report.format()
    for issue in EXPECTED_COUNTS:
        assert issue.value in text

    targets = {
        int(t["image_id"]): t
        for b in build_dataloader(out, AugmentationConfig(), LoaderConfig(), train=False)
        for t in b.targets
    }
    assert targets[6]["boxes"].shape == (0, 4) and targets[6]["labels"].shape == (0,)  # crowd not a target


def test_strict_mode_fails_with_the_report(write_coco, tmp_path: Path) -> None:
    images, annotations = _bad_corpus()
    json_path, image_dir = write_coco(images, annotations, CATEGORIES)
    out = tmp_path / "shards"
    with pytest.raises(StrictValidationError) as raised:
        convert_coco_to_shards(
            ConvertConfig(
                annotations=json_path, images=image_dir, out=out, strict=True, progress=False, min_kept_fraction=0.0
            )
        )
    assert raised.value.report.count(Issue.CORRUPT_IMAGE) == 3
    assert not out.exists()

    command = [sys.executable, "pipelines/prepare_data.py", "coco", "--annotations", str(json_path)]
    command += ["--images", str(image_dir), "--out", str(out), "--strict", "--min-kept-fraction", "0"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "validation report" in result.stdout and "missing_image_file" in result.stdout
    assert not out.exists()
    saved = json.loads((tmp_path / "shards.validation.json").read_text())
    assert saved["counts"]["corrupt_image"] == 3


def test_strict_mode_accepts_clean_data_and_crowd(write_coco, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images, annotations = _clean_corpus()
    json_path, image_dir = write_coco(images, annotations, CATEGORIES)
    out = tmp_path / "shards"
    args = ["coco", "--annotations", str(json_path), "--images", str(image_dir), "--out", str(out), "--strict"]
    assert prepare_main(args) == 0
    assert load_meta(out).counts.images == 5
    assert "crowd_annotation" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--annotations", "nope.json", "--images", ".", "--out", "x"], "annotation file nope.json does not exist"),
        (["--annotations", "pyproject.toml", "--images", "missing_dir", "--out", "x"], "image folder missing_dir"),
        (["--annotations", "pyproject.toml", "--images", ".", "--out", "x", "--shard-size-mb", "-1"], "shard_size_mb"),
        (["--annotations", "pyproject.toml", "--images", ".", "--out", "x"], "not valid json"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(REPO)
    assert prepare_main(["coco", *[a.replace("x", str(tmp_path / "out")) if a == "x" else a for a in args]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_label_map_is_vectorised_and_strict(write_coco, tmp_path: Path) -> None:
    images, annotations = _clean_corpus()
    json_path, image_dir = write_coco(images, annotations, CATEGORIES)
    _convert(json_path, image_dir, tmp_path / "shards")
    meta = load_meta(tmp_path / "shards")
    assert meta.num_classes == 3 and meta.category_names == ["bird", "cat", "kite"]
    assert meta.category_id_to_label(11) == 2
    assert meta.category_id_to_label(torch.tensor([[5, 2], [11, 11]])).tolist() == [[1, 0], [2, 2]]
    assert meta.category_id_to_label(np.array([2, 5])).dtype == np.int64
    assert meta.label_to_category_id(torch.tensor([2, 0, 1])).tolist() == [11, 2, 5]
    assert meta.label_to_category_id(1) == 5
    with pytest.raises(KeyError, match="unknown category ids"):
        meta.category_id_to_label(np.array([2, 3]))
    with pytest.raises(KeyError):
        meta.label_to_category_id(torch.tensor([3]))


def test_load_meta_explains_a_missing_dataset(tmp_path: Path) -> None:
    with pytest.raises(MetaNotFoundError, match=r"pipelines/prepare_data\.py"):
        load_meta(tmp_path)


def test_corrupt_row_in_a_shard_is_skipped_and_counted(corrupt_shard_dir, caplog: pytest.LogCaptureFixture) -> None:
    shard_dir, corrupt_id = corrupt_shard_dir
    meta = load_meta(shard_dir)
    with caplog.at_level(logging.WARNING):
        batches = list(build_dataloader(shard_dir, AugmentationConfig(), LoaderConfig(batch_size=4), train=True))
    assert sum(b.num_corrupt for b in batches) == 1
    assert [i for b in batches for i in b.corrupt_image_ids] == [corrupt_id]
    seen = [int(t["image_id"]) for b in batches for t in b.targets]
    assert len(seen) == meta.counts.images - 1 and corrupt_id not in seen
    assert f"image_id={corrupt_id}" in caplog.text


@pytest.mark.parametrize("seed", [None, 3])
def test_dataloader_workers_split_an_epoch_exactly(synthetic_root: Path, seed: int | None) -> None:
    train_dir = synthetic_root / "train"
    loader = LoaderConfig(batch_size=3, seed=seed)
    dataloader = build_dataloader(train_dir, AugmentationConfig(), loader, train=True, num_workers=2)
    epochs = []
    for epoch in range(2):
        dataloader.dataset.set_epoch(epoch)
        epochs.append([int(t["image_id"]) for batch in dataloader for t in batch.targets])
    expected = sorted(r["image_id"] for r in pq.read_table(load_meta(train_dir).shard_paths(train_dir)).to_pylist())
    assert [sorted(ids) for ids in epochs] == [expected, expected]  # every image exactly once per epoch
    assert epochs[0] != epochs[1]  # reshuffled


def test_drop_last_applies_to_training_only(synthetic_root: Path) -> None:
    val_dir = synthetic_root / "val"  # 6 images: batches of 4 leave an incomplete last batch
    expected = sorted(r["image_id"] for r in pq.read_table(load_meta(val_dir).shard_paths(val_dir)).to_pylist())
    loader = LoaderConfig(batch_size=4, drop_last=True, shuffle="none")

    def ids(train: bool) -> list[int]:
        batches = build_dataloader(val_dir, AugmentationConfig(), loader, train=train)
        return [int(t["image_id"]) for b in batches for t in b.targets]

    assert len(expected) % 4 != 0
    assert sorted(ids(train=False)) == expected  # evaluation sees every image exactly once
    assert len(ids(train=True)) == len(expected) // 4 * 4


def test_iscrowd_other_than_0_or_1_skips_the_annotation(write_coco, tmp_path: Path) -> None:
    images = [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 2, "bbox": [1, 1, 20, 20], "iscrowd": "0"},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [30, 30, 20, 20], "iscrowd": "false"},
        {"id": 3, "image_id": 1, "category_id": 2, "bbox": [5, 30, 20, 20], "iscrowd": 2},
        {"id": 4, "image_id": 1, "category_id": 5, "bbox": [2, 2, 10, 10], "iscrowd": 0},
        {"id": 5, "image_id": 1, "category_id": 5, "bbox": [3, 3, 10, 10], "iscrowd": True},
        {"id": 6, "image_id": 1, "category_id": 5, "bbox": [4, 4, 10, 10]},
        {"id": 7, "image_id": 1, "category_id": 5, "bbox": [6, 6, 10, 10], "iscrowd": None},  # null: as missing
    ]
    json_path, image_dir = write_coco(images, annotations, CATEGORIES)
    out = tmp_path / "shards"
    report = convert_coco_to_shards(
        ConvertConfig(annotations=json_path, images=image_dir, out=out, progress=False)
    ).report
    assert report.count(Issue.INVALID_ANNOTATION_RECORD) == 3
    assert report.examples[Issue.INVALID_ANNOTATION_RECORD.value] == [1, 2, 3]
    assert report.count(Issue.CROWD_ANNOTATION) == 1 and report.count(Issue.ISCROWD_MISSING) == 2
    (row,) = pq.read_table(load_meta(out).shard_paths(out)).to_pylist()
    assert row["iscrowd"] == [0, 1, 0, 0] and row["category_ids"] == [5, 5, 5, 5]


@pytest.mark.parametrize("category_id", [1.7, 2.0, "2", True, None])
def test_category_id_must_be_an_int(
    category_id: object, write_coco, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    images = [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}]
    categories = [*CATEGORIES, {"id": category_id, "name": "odd"}]
    json_path, image_dir = write_coco(images, [], categories)
    out = tmp_path / "shards"
    with pytest.raises(CocoFormatError, match=r"category .*'odd'.*id must be an int"):
        _convert(json_path, image_dir, out)
    assert prepare_main(["coco", "--annotations", str(json_path), "--images", str(image_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "'odd'" in err and "\n" not in err
    assert not out.exists()
