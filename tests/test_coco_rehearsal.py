"""The COCO-shaped generator (`sd_detr.data.coco_like`) and the COCO rehearsal (`benchmarks/coco_rehearsal.py`)."""

from __future__ import annotations

import json
import re
import shlex
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd_detr.data.coco_like import (
    CATEGORIES,
    IMAGE_SIZES,
    CocoLikeConfig,
    category_look,
    generate,
    generate_split,
    main,
    size_class,
    uncompressed_rle,
)
from tests.pipeline_helpers import load_benchmark

REPO = Path(__file__).resolve().parents[1]
COCO_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]
THIRD_PARTY = {"include_iscrowd": False, "include_area": False, "include_annotation_ids": False}


def _load_rehearsal():
    return load_benchmark("coco_rehearsal")


@pytest.fixture(scope="module")
def coco_like(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """40 train images (seed 3), generated once: (root, parsed json)."""
    root = tmp_path_factory.mktemp("coco_like")
    split = generate_split(root, CocoLikeConfig(split="train", num_images=40, seed=3))
    return root, json.loads(split.annotations.read_text())


def test_categories_are_cocos_80_with_its_ids_and_names() -> None:
    assert [c["id"] for c in CATEGORIES] == COCO_IDS
    names = {c["id"]: c["name"] for c in CATEGORIES}
    assert (names[1], names[13], names[67], names[90]) == ("person", "stop sign", "dining table", "toothbrush")
    assert len(set(names.values())) == 80
    assert all(list(c) == ["supercategory", "id", "name"] and c["supercategory"] for c in CATEGORIES)
    assert len({category_look(i) for i in COCO_IDS}) == 80  # every category looks different


def test_json_has_cocos_fields_in_cocos_order(coco_like) -> None:
    root, coco = coco_like
    assert list(coco) == ["info", "licenses", "images", "annotations", "categories"]
    assert len(coco["licenses"]) == 8 and coco["categories"] == CATEGORIES
    image_keys = ["license", "file_name", "coco_url", "height", "width", "date_captured", "flickr_url", "id"]
    assert all(list(im) == image_keys for im in coco["images"])
    assert all(re.fullmatch(r"\d{12}\.jpg", im["file_name"]) for im in coco["images"])
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", im["date_captured"]) for im in coco["images"])
    annotation_keys = ["segmentation", "area", "iscrowd", "image_id", "bbox", "category_id", "id"]
    assert all(list(a) == annotation_keys for a in coco["annotations"])
    ids = [a["id"] for a in coco["annotations"]]
    assert len(set(ids)) == len(ids)
    sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        assert all(isinstance(v, float) for v in ann["bbox"]) and isinstance(ann["area"], float)
        width, height = sizes[ann["image_id"]]
        assert x >= 0 and y >= 0 and w >= 2 and h >= 2 and x + w <= width + 1e-6 and y + h <= height + 1e-6
        assert ann["category_id"] in COCO_IDS
    for image in coco["images"][:5]:  # the files are JPEGs of the recorded size
        with Image.open(root / "train2017" / image["file_name"]) as picture:
            assert picture.format == "JPEG" and picture.size == (image["width"], image["height"])


def test_object_sizes_crowds_and_empty_images_are_coco_like(coco_like) -> None:
    _, coco = coco_like
    plain = [a for a in coco["annotations"] if not a["iscrowd"]]
    assert 4.0 <= len(plain) / len(coco["images"]) <= 10.0
    shares = Counter(size_class(a["area"]) for a in plain)
    assert abs(shares["small"] / len(plain) - 0.41) < 0.1
    assert abs(shares["medium"] / len(plain) - 0.34) < 0.1
    assert abs(shares["large"] / len(plain) - 0.25) < 0.1
    image_sizes = Counter((im["width"], im["height"]) for im in coco["images"])
    assert set(image_sizes) <= {(w, h) for w, h, _ in IMAGE_SIZES} and len(image_sizes) >= 5
    assert image_sizes[(640, 480)] == max(image_sizes.values())  # COCO's most common size
    polygons = [a for a in plain if isinstance(a["segmentation"], list) and len(a["segmentation"][0]) >= 6]
    assert len(polygons) == len(plain)


def test_crowd_regions_are_rle_that_pycocotools_decodes(tmp_path) -> None:
    from pycocotools import mask as mask_utils

    cfg = CocoLikeConfig(split="val", num_images=6, seed=1, crowd_fraction=1.0, empty_fraction=1.0)
    coco = json.loads(generate_split(tmp_path, cfg).annotations.read_text())
    assert coco["annotations"] and all(a["iscrowd"] == 1 for a in coco["annotations"])  # only the crowds
    for ann in coco["annotations"]:
        assert ann["id"] == 900_100_000_000 + ann["image_id"]  # COCO numbers crowd annotations this way
        height, width = ann["segmentation"]["size"]
        decoded = mask_utils.decode(mask_utils.frPyObjects(ann["segmentation"], height, width))
        assert int(decoded.sum()) == ann["area"]
        ys, xs = np.nonzero(decoded)
        assert ann["bbox"] == [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)]
    assert not [im for im in coco["images"] if im["id"] not in {a["image_id"] for a in coco["annotations"]}]


def test_uncompressed_rle_round_trips_through_pycocotools() -> None:
    from pycocotools import mask as mask_utils

    for seed, first in ((0, False), (1, True)):
        mask = np.random.default_rng(seed).random((7, 5)) < 0.4
        mask[0, 0] = first
        rle = uncompressed_rle(mask)
        assert (rle["counts"][0] == 0) == first
        decoded = mask_utils.decode(mask_utils.frPyObjects(rle, 7, 5))
        np.testing.assert_array_equal(decoded.astype(bool), mask)


def test_third_party_json_leaves_out_iscrowd_area_and_ids_with_the_same_images(tmp_path) -> None:
    full = generate(tmp_path / "full", 8, 1, seed=5)["train"]
    third = generate(tmp_path / "third", 8, 1, seed=5, **THIRD_PARTY)["train"]
    full_json, third_json = json.loads(full.annotations.read_text()), json.loads(third.annotations.read_text())
    assert full_json["images"] == third_json["images"]
    for record in full_json["images"]:
        name = record["file_name"]
        assert (full.images / name).read_bytes() == (third.images / name).read_bytes()
    assert all(list(a) == ["segmentation", "image_id", "bbox", "category_id"] for a in third_json["annotations"])
    plain = [a for a in full_json["annotations"] if not a["iscrowd"]]
    assert len(third_json["annotations"]) == len(plain)  # crowd regions are not annotated without iscrowd
    assert [a["bbox"] for a in third_json["annotations"]] == [a["bbox"] for a in plain]
    only_area = generate_split(tmp_path / "noarea", CocoLikeConfig(split="train", num_images=3, include_area=False))
    assert all("area" not in a and "iscrowd" in a for a in json.loads(only_area.annotations.read_text())["annotations"])


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path) -> None:
    first, second, other = (
        generate_split(tmp_path / name, CocoLikeConfig(split="val", num_images=3, seed=seed))
        for name, seed in (("a", 11), ("b", 11), ("c", 12))
    )
    assert first.annotations.read_bytes() == second.annotations.read_bytes()
    files = sorted(p.name for p in first.images.iterdir())
    assert files == sorted(p.name for p in second.images.iterdir())
    assert all((first.images / f).read_bytes() == (second.images / f).read_bytes() for f in files)
    assert first.annotations.read_bytes() != other.annotations.read_bytes()
    ids = [im["id"] for im in json.loads(first.annotations.read_text())["images"]]
    assert min(ids) > 1_000_000  # val ids never meet train ids


def test_generated_splits_convert_with_no_issue_in_strict_mode(tmp_path) -> None:
    from sd_detr.data.coco import convert_coco_to_shards
    from sd_detr.data.config import ConvertConfig
    from sd_detr.data.meta import load_meta

    split = generate(tmp_path / "coco", 6, 2, seed=2)["val"]
    cfg = ConvertConfig(annotations=split.annotations, images=split.images, out=tmp_path / "val", strict=True,
                        progress=False)  # fmt: skip
    result = convert_coco_to_shards(cfg)
    meta = load_meta(tmp_path / "val")
    assert result.report.ok and meta.counts.images == 2 and meta.num_classes == 80


def test_generator_cli_writes_cocos_layout_and_rejects_bad_counts(tmp_path, caplog) -> None:
    assert main(["--out", str(tmp_path), "--num-train", "2", "--num-val", "1", "--third-party"]) == 0
    assert sorted(p.name for p in (tmp_path / "annotations").iterdir()) == [
        "instances_train2017.json",
        "instances_val2017.json",
    ]
    assert len(list((tmp_path / "train2017").glob("*.jpg"))) == 2
    assert main(["--out", str(tmp_path / "bad"), "--num-train", "0"]) == 2
    assert "num_images" in caplog.text


def _normalized(text: str) -> str:
    return " ".join(text.replace("\\\n", " ").split())


def test_readme_shows_the_commands_the_rehearsal_runs() -> None:
    rehearsal = _load_rehearsal()
    readme = _normalized((REPO / "README.md").read_text())
    for where, commands in rehearsal.readme_commands().items():
        for command in commands:
            assert _normalized(shlex.join(command)) in readme, f"README lacks the {where} command {command}"


@pytest.mark.slow
@pytest.mark.ray
def test_rehearsal_runs_the_recipe_for_both_variants(ray_local, tmp_path, monkeypatch) -> None:
    """A few steps at full image size (train 480-800 / max 1333, eval 800): the README's recipe runs."""
    from mlflow.tracking import MlflowClient

    rehearsal = _load_rehearsal()
    # join the session's Ray (one local Ray per test session); the job is still `pipelines/train.py` in a
    # subprocess, exactly as the README runs it
    monkeypatch.setenv("RAY_ADDRESS", ray_local.get_runtime_context().gcs_address)
    work = tmp_path / "work"
    argv = ["--size", "reduced", "--images", "4", "--val-images", "2", "--work-dir", str(work)]
    assert rehearsal.main(argv) == 0
    assert not (work / "coco").exists()  # the source was deleted before training
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    for variant in rehearsal.VARIANTS:
        log = (work / "logs" / f"train-{variant}.log").read_text()
        assert "[epoch 0] step" in log
        runs = client.search_runs(
            [client.get_experiment_by_name(rehearsal.EXPERIMENT).experiment_id],
            f"attributes.run_name = 'coco-rehearsal-{variant}'",
        )
        assert [r.info.status for r in runs] == ["FINISHED"]
        assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_AP")] == [0]
        assert client.search_model_versions(f"name = 'coco-rehearsal-{variant}'")
        assert runs[0].data.params["model.num_queries"] == "300"
        assert runs[0].data.params["data.augmentation.eval_size"] == "800"


def test_images_per_worker_divides_by_the_workers_the_jobs_ran() -> None:
    """The table's "images/s per worker" uses the jobs' own worker count: --gpu's 1, the CPU's 2, or a --set."""
    rehearsal = _load_rehearsal()
    parse = rehearsal._parser().parse_args
    assert rehearsal.worker_count(parse([])) == 2 and rehearsal.worker_count(parse(["--gpu"])) == 1
    assert rehearsal.worker_count(parse(["--gpu", "--set", "scaling.num_workers=4"])) == 4
