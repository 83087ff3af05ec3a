"""Converter on real-world files: image formats, a wrong image folder, --out's parents, one conversion per --out."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.prepare_data import main as prepare_main
from sd_detr.data import samples
from sd_detr.data.coco import lock_path
from sd_detr.data.config import AugmentationConfig, LoaderConfig
from sd_detr.data.dataset import build_dataloader
from sd_detr.data.meta import load_ground_truth, load_meta
from sd_detr.data.samples import MAX_IMAGE_PIXELS, CorruptImageError, decode_image
from sd_detr.data.validation import Issue, ValidationReport

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = [{"id": 1, "name": "thing"}]


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG (grayscale for [H, W], RGB for [H, W, 3]) written by hand: Pillow cannot write 48-bit RGB."""
    height, width = pixels.shape[:2]
    colour_type = 0 if pixels.ndim == 2 else 2
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def two_tone(width: int, height: int) -> Image.Image:
    """Left half red, right half blue: shows whether an image was rotated."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(pixels)


def exif_rotated_jpeg(width: int, height: int, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(two_tone(width, height), "JPEG", exif=exif.tobytes(), quality=95)


GRAY16 = (np.arange(48 * 40, dtype=np.uint32).reshape(40, 48) * 34).astype(np.uint16)  # 0 .. 65246
RGB16 = np.stack([GRAY16, 65535 - GRAY16, np.full_like(GRAY16, 0x1234)], axis=-1)


def format_corpus() -> list[dict]:
    """One image record per documented format case (docs/data.md, "Image formats"). Bombs: 96 Mpx is above
    the limit but Pillow only warns; at 200 Mpx Pillow raises."""
    return [
        {"id": 1, "file_name": "gray16.png", "width": 48, "height": 40, "_bytes": png16(GRAY16)},
        {"id": 2, "file_name": "rgb16.png", "width": 48, "height": 40, "_bytes": png16(RGB16)},
        {
            "id": 3,
            "file_name": "cmyk.jpg",
            "width": 40,
            "height": 30,
            "_bytes": encode(Image.new("RGB", (40, 30), (200, 40, 10)).convert("CMYK"), "JPEG", quality=95),
        },
        {
            "id": 4,
            "file_name": "gray.jpg",
            "width": 30,
            "height": 20,
            "_bytes": encode(Image.new("L", (30, 20), 77), "JPEG", quality=95),
        },
        {"id": 5, "file_name": "exif6.jpg", "width": 60, "height": 40, "_bytes": exif_rotated_jpeg(60, 40)},
        {
            "id": 6,
            "file_name": "exif6_json_rotated.jpg",
            "width": 40,
            "height": 60,
            "_bytes": exif_rotated_jpeg(60, 40),
        },
        {
            "id": 7,
            "file_name": "bomb_warn.png",
            "width": 12000,
            "height": 8000,
            "_bytes": encode(Image.new("1", (12000, 8000)), "PNG"),
        },
        {
            "id": 8,
            "file_name": "bomb_error.png",
            "width": 20000,
            "height": 10000,
            "_bytes": encode(Image.new("1", (20000, 10000)), "PNG"),
        },
        {
            "id": 9,
            "file_name": "rgba.png",
            "width": 20,
            "height": 20,
            "_bytes": encode(Image.new("RGBA", (20, 20), (10, 200, 30, 0)), "PNG"),
        },
        {
            "id": 10,
            "file_name": "palette.png",
            "width": 20,
            "height": 20,
            "_bytes": encode(
                Image.new("RGB", (20, 20), (0, 128, 255)).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"
            ),
        },
    ]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns, then we refuse
def test_image_formats_have_their_documented_outcome(
    write_coco, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = format_corpus()
    annotations = [
        {"id": i["id"], "image_id": i["id"], "category_id": 1, "bbox": [1.0, 2.0, 10.0, 8.0], "area": 80.0}
        for i in images
    ]
    json_path, image_dir = write_coco(images, annotations, CATEGORIES)
    out = tmp_path / "shards"
    args = ["coco", "--annotations", str(json_path), "--images", str(image_dir), "--out", str(out)]
    with caplog.at_level(logging.WARNING):
        assert prepare_main(args) == 0
    report = ValidationReport.model_validate_json((out / "_validation.json").read_text())
    assert report.examples[Issue.CORRUPT_IMAGE.value] == [7, 8]  # decompression bombs, by image id
    assert report.examples[Issue.IMAGE_SIZE_MISMATCH.value] == [6]  # json gives the EXIF-rotated size
    assert "decompression-bomb guard" in caplog.text and "EXIF orientation 6" in caplog.text

    rows = {r["image_id"]: r for r in pq.read_table(load_meta(out).shard_paths(out)).to_pylist()}
    assert sorted(rows) == [1, 2, 3, 4, 5, 9, 10]
    pixels = {image_id: decode_image(row["image"])[0] for image_id, row in rows.items()}
    for image_id, array in pixels.items():  # every kept image: 8-bit RGB of the json's size
        record = next(i for i in images if i["id"] == image_id)
        assert array.dtype == np.uint8 and array.shape == (record["height"], record["width"], 3)
    expected_gray = np.rint(GRAY16 / 257.0).astype(np.uint8)  # 16-bit gray: scaled, not clipped at 255
    assert all(np.array_equal(pixels[1][..., c], expected_gray) for c in range(3))
    assert np.abs(pixels[2].astype(int) - (RGB16 >> 8)).max() <= 1  # 16-bit RGB: the high byte
    assert np.abs(pixels[3][10, 20].astype(int) - [200, 40, 10]).max() <= 6  # CMYK -> RGB
    assert np.abs(pixels[4].astype(int) - 77).max() <= 2 and (pixels[4][..., 0] == pixels[4][..., 2]).all()
    exif = pixels[5]  # stored grid, not rotated: left half red, right half blue, as written
    assert (exif[:, 5, 0] > 200).all() and (exif[:, 5, 2] < 60).all() and (exif[:, 55, 2] > 200).all()
    assert pixels[9][0, 0].tolist() == [10, 200, 30]  # alpha dropped, colour kept
    assert pixels[10][0, 0].tolist() == [0, 128, 255]

    ground_truth = load_ground_truth(out)
    assert sorted(i["id"] for i in ground_truth["images"]) == sorted(rows)
    batches = list(build_dataloader(out, AugmentationConfig(), LoaderConfig(), train=False))
    assert sum(b.num_corrupt for b in batches) == 0  # training decode agrees with the converter
    targets = {int(t["image_id"]): t for b in batches for t in b.targets}
    assert sorted(targets) == sorted(rows)
    for image_id, target in targets.items():
        assert target["orig_size"].tolist() == [rows[image_id]["height"], rows[image_id]["width"]]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decode_rejects_bombs_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    side = int(MAX_IMAGE_PIXELS**0.5) + 1
    with pytest.raises(CorruptImageError, match="decompression-bomb guard"):
        decode_image(encode(Image.new("1", (side, side)), "PNG"))
    monkeypatch.setattr(samples, "MAX_IMAGE_PIXELS", 1000)  # the boundary, on small images
    assert decode_image(encode(Image.new("L", (40, 25)), "PNG"))[1] == (25, 40)
    with pytest.raises(CorruptImageError, match=r"40x26 = 0\.0 Mpx exceeds"):
        decode_image(encode(Image.new("L", (40, 26)), "PNG"))


def _coco_in_subfolder(write_coco, count: int = 4) -> tuple[Path, Path]:
    """A COCO json whose images lie in `<image_dir>/train/`, i.e. `image_dir` is the wrong --images."""
    images = [{"id": i, "file_name": f"{i:06d}.png", "width": 32, "height": 24} for i in range(1, count + 1)]
    json_path, image_dir = write_coco(images, [], CATEGORIES)
    (image_dir / "train").mkdir()
    for image in images:
        (image_dir / image["file_name"]).rename(image_dir / "train" / image["file_name"])
    return json_path, image_dir


def test_wrong_image_folder_fails_with_a_hint(write_coco, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    json_path, image_dir = _coco_in_subfolder(write_coco)
    out = tmp_path / "shards"
    args = ["coco", "--annotations", str(json_path), "--images", str(image_dir), "--out", str(out)]
    assert prepare_main(args) == 1
    err = capsys.readouterr().err
    assert "kept 0 of the 4 image records" in err and "000001.png" in err
    assert f"not found in {image_dir.resolve()}" in err
    assert f"exists in {image_dir.resolve() / 'train'}: is that the --images folder?" in err
    assert not out.exists() and json.loads((tmp_path / "shards.validation.json").read_text())["images_out"] == 0
    assert prepare_main([*args[:4], str(image_dir / "train"), *args[5:]]) == 0
    assert load_meta(out).counts.images == 4


def test_too_few_kept_images_fail_unless_allowed(write_coco, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    json_path, image_dir = _coco_in_subfolder(write_coco)
    (image_dir / "train" / "000001.png").rename(image_dir / "000001.png")  # 1 of 4 where the json says
    out = tmp_path / "shards"
    args = ["coco", "--annotations", str(json_path), "--images", str(image_dir), "--out", str(out)]
    assert prepare_main(args) == 1
    assert "kept 1 of the 4 image records" in capsys.readouterr().err and not out.exists()
    assert prepare_main([*args, "--min-kept-fraction", "0.25"]) == 0
    assert load_meta(out).counts.images == 1


def test_out_parents_are_created(write_coco, tmp_path: Path) -> None:
    json_path, image_dir = write_coco([{"id": 1, "file_name": "a.png", "width": 20, "height": 20}], [], CATEGORIES)
    out = tmp_path / "deep" / "er" / "shards"
    args = ["coco", "--annotations", str(json_path), "--images", str(image_dir), "--out", str(out)]
    assert prepare_main(args) == 0 and load_meta(out).counts.images == 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["shards"]  # no lock or temp files left


def test_out_below_a_file_is_refused(write_coco, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    json_path, image_dir = write_coco([{"id": 1, "file_name": "a.png", "width": 20, "height": 20}], [], CATEGORIES)
    (tmp_path / "afile").write_text("")
    args = ["coco", "--annotations", str(json_path), "--images", str(image_dir), "--out", str(tmp_path / "afile/x")]
    assert prepare_main(args) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


_SLOW_CONVERSION = """
import sys, time
from sd_detr.data import shards
add = shards.ShardWriter.add
def slow_add(self, row):
    print("writing", flush=True)
    time.sleep(120)
    add(self, row)
shards.ShardWriter.add = slow_add
from pipelines.prepare_data import main
sys.exit(main(sys.argv[1:]))
"""


def test_one_conversion_per_out_and_a_killed_one_does_not_block(
    write_coco, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    images = [{"id": i, "file_name": f"{i}.png", "width": 20, "height": 20} for i in range(1, 4)]
    json_path, image_dir = write_coco(images, [], CATEGORIES)
    out = tmp_path / "shards"
    args = ["coco", "--annotations", str(json_path), "--images", str(image_dir), "--out", str(out)]
    first = subprocess.Popen(
        [sys.executable, "-c", _SLOW_CONVERSION, *args], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout.readline().strip() == "writing"  # the first conversion is inside its write loop
        assert prepare_main(args) == 2
        err = capsys.readouterr().err
        assert f"pid {first.pid} on host {socket.gethostname()}" in err and "conversion into" in err
        assert not out.exists()
    finally:
        os.kill(first.pid, signal.SIGKILL)  # a crash: no cleanup runs
        first.wait(timeout=30)
    assert lock_path(out).exists()  # left behind by the killed conversion, but no longer locked
    assert prepare_main(args) == 0
    assert load_meta(out).counts.images == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # lock and temp dir gone
