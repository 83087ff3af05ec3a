"""A COCO-shaped synthetic dataset, for rehearsing the COCO recipe on a machine without COCO.

What it copies from COCO 2017 instances:
- the 80 categories: ids 1..90 with COCO's gaps, names, supercategories;
- the common image sizes (640x480, 480x640, 640x427, 500x375, 427x640, 640x640, 512x512, ...) and a few
  extreme aspect ratios (640x213, 213x640);
- the object-size mix by `area`: about 41 % small (< 32² px), 34 % medium, 25 % large (>= 96² px), with
  about 7 objects per image, objects cut by the image border and partly hidden by later ones;
- crowd regions (`iscrowd=1`, segmentation as uncompressed RLE, annotation id 900100000000 + image id as
  COCO numbers them) and a few images without any object;
- the files: JPEGs named `000000xxxxxx.jpg` in `<root>/<split>2017/`, the json in
  `<root>/annotations/instances_<split>2017.json` with `info`, `licenses`, `images` (license, file_name,
  coco_url, height, width, date_captured, flickr_url, id), `annotations` (segmentation polygons, area,
  iscrowd, image_id, bbox as floats, category_id, id) and `categories` (supercategory, id, name), keys in
  COCO's order.

What it draws: category k is a (shape, hue) pair, 8 shapes x 10 hues, filled solid, as a gradient or with
stripes (hue and saturation jittered) on a desaturated textured background with unannotated clutter (the
background, fill and clutter helpers of :mod:`sd_detr.data.synthetic`), so a detector has something to
learn. Boxes: the polygon's extent (clipped to the image) for an unhidden object, the tight box of the
visible pixels for a partly hidden one; `area` is the visible pixel count. Polygons are the full outline
(clipped to the image), also for partly hidden objects.

Third-party exports: `include_iscrowd`, `include_area`, `include_annotation_ids` = False drop those keys
from every annotation; without `iscrowd` the crowd regions stay in the pictures but are not annotated (an
exporter without crowd support). The images are the same bytes whatever these options say.

Deterministic: image i of a split is drawn from its own generator seeded by (seed, split, i) and saved as
JPEG with fixed settings, so a seed gives byte-identical files.

    python -m sd_detr.data.coco_like --out /tmp/coco --num-train 16 --num-val 8 [--seed 0] [--third-party]
"""

from __future__ import annotations

import argparse
import colorsys
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm import tqdm

from sd_detr.data.synthetic import _background, _clutter, _fill, _polygon

logger = logging.getLogger(__name__)

_COCO_CATEGORIES: tuple[tuple[int, str, str], ...] = (
    (1, "person", "person"), (2, "bicycle", "vehicle"), (3, "car", "vehicle"), (4, "motorcycle", "vehicle"),
    (5, "airplane", "vehicle"), (6, "bus", "vehicle"), (7, "train", "vehicle"), (8, "truck", "vehicle"),
    (9, "boat", "vehicle"), (10, "traffic light", "outdoor"), (11, "fire hydrant", "outdoor"),
    (13, "stop sign", "outdoor"), (14, "parking meter", "outdoor"), (15, "bench", "outdoor"),
    (16, "bird", "animal"), (17, "cat", "animal"), (18, "dog", "animal"), (19, "horse", "animal"),
    (20, "sheep", "animal"), (21, "cow", "animal"), (22, "elephant", "animal"), (23, "bear", "animal"),
    (24, "zebra", "animal"), (25, "giraffe", "animal"), (27, "backpack", "accessory"),
    (28, "umbrella", "accessory"), (31, "handbag", "accessory"), (32, "tie", "accessory"),
    (33, "suitcase", "accessory"), (34, "frisbee", "sports"), (35, "skis", "sports"), (36, "snowboard", "sports"),
    (37, "sports ball", "sports"), (38, "kite", "sports"), (39, "baseball bat", "sports"),
    (40, "baseball glove", "sports"), (41, "skateboard", "sports"), (42, "surfboard", "sports"),
    (43, "tennis racket", "sports"), (44, "bottle", "kitchen"), (46, "wine glass", "kitchen"),
    (47, "cup", "kitchen"), (48, "fork", "kitchen"), (49, "knife", "kitchen"), (50, "spoon", "kitchen"),
    (51, "bowl", "kitchen"), (52, "banana", "food"), (53, "apple", "food"), (54, "sandwich", "food"),
    (55, "orange", "food"), (56, "broccoli", "food"), (57, "carrot", "food"), (58, "hot dog", "food"),
    (59, "pizza", "food"), (60, "donut", "food"), (61, "cake", "food"), (62, "chair", "furniture"),
    (63, "couch", "furniture"), (64, "potted plant", "furniture"), (65, "bed", "furniture"),
    (67, "dining table", "furniture"), (70, "toilet", "furniture"), (72, "tv", "electronic"),
    (73, "laptop", "electronic"), (74, "mouse", "electronic"), (75, "remote", "electronic"),
    (76, "keyboard", "electronic"), (77, "cell phone", "electronic"), (78, "microwave", "appliance"),
    (79, "oven", "appliance"), (80, "toaster", "appliance"), (81, "sink", "appliance"),
    (82, "refrigerator", "appliance"), (84, "book", "indoor"), (85, "clock", "indoor"), (86, "vase", "indoor"),
    (87, "scissors", "indoor"), (88, "teddy bear", "indoor"), (89, "hair drier", "indoor"),
    (90, "toothbrush", "indoor"),
)  # fmt: skip
CATEGORIES: list[dict[str, Any]] = [{"supercategory": s, "id": i, "name": n} for i, n, s in _COCO_CATEGORIES]
"""COCO 2017's 80 categories as its json lists them (supercategory, id, name), ids 1..90 with gaps."""

LICENSES: list[dict[str, Any]] = [
    {"url": f"http://creativecommons.org/licenses/{code}/2.0/", "id": i, "name": name}
    for i, (code, name) in enumerate(
        [
            ("by-nc-sa", "Attribution-NonCommercial-ShareAlike License"),
            ("by-nc", "Attribution-NonCommercial License"),
            ("by-nc-nd", "Attribution-NonCommercial-NoDerivs License"),
            ("by", "Attribution License"),
            ("by-sa", "Attribution-ShareAlike License"),
            ("by-nd", "Attribution-NoDerivs License"),
        ],
        start=1,
    )
] + [
    {"url": "http://flickr.com/commons/usage/", "id": 7, "name": "No known copyright restrictions"},
    {"url": "http://www.usa.gov/copyright.shtml", "id": 8, "name": "United States Government Work"},
]

IMAGE_SIZES: tuple[tuple[int, int, float], ...] = (
    (640, 480, 0.30), (640, 427, 0.18), (480, 640, 0.12), (427, 640, 0.08), (500, 375, 0.07),
    (640, 640, 0.05), (512, 512, 0.04), (375, 500, 0.03), (640, 360, 0.04), (612, 612, 0.04),
    (640, 213, 0.03), (213, 640, 0.02),
)  # fmt: skip
"""(width, height, share of images): COCO's most common sizes plus extreme aspect ratios (3:1, 1:3)."""

SHAPES: tuple[str, ...] = ("rectangle", "ellipse", "triangle", "cross", "ring", "diamond", "hexagon", "star")
NUM_HUES = 10
SMALL_AREA = 32.0**2
LARGE_AREA = 96.0**2
SPLIT_CODES: dict[str, int] = {"train": 0, "val": 1}
IMAGE_ID_BASE: dict[str, int] = {"train": 0, "val": 1_000_000}
CROWD_ANNOTATION_ID_BASE = 900_100_000_000
_FILL_FACTOR = {  # shape area / (w * h) of its extent, to size a shape for a target area
    "rectangle": 1.0, "ellipse": math.pi / 4, "triangle": 0.5, "cross": 0.6, "ring": 0.5,
    "diamond": 0.5, "hexagon": 0.65, "star": 0.33,
}  # fmt: skip
_MIN_VISIBLE_PIXELS = 12
_CAPTURE_START = datetime(2013, 11, 14, 0, 0, 0)


class CocoLikeConfig(BaseModel):
    """Settings of one generated split (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    split: Literal["train", "val"] = Field(description="Split name: files go to `<split>2017/`.")
    num_images: int = Field(ge=1, le=300_000, description="Images in the split.")
    seed: int = Field(default=0, description="Generator seed; the same seed gives identical bytes.")
    mean_objects: float = Field(default=7.0, gt=0.0, description="Mean objects per non-empty image (COCO: 7.3).")
    max_objects: int = Field(default=40, ge=1, le=99, description="Most annotated objects in one image.")
    empty_fraction: float = Field(default=0.03, ge=0.0, le=1.0, description="Share of images without objects.")
    crowd_fraction: float = Field(default=0.06, ge=0.0, le=1.0, description="Share of images with a crowd region.")
    area_mix: tuple[float, float, float] = Field(
        default=(0.41, 0.34, 0.25), description="Drawn shares of small / medium / large objects (sum 1)."
    )
    max_occlusion: float = Field(
        default=0.5, ge=0.0, lt=1.0, description="Largest share of an object that later objects may hide."
    )
    jpeg_quality: int = Field(default=90, ge=1, le=100, description="JPEG quality of the image files.")
    include_iscrowd: bool = Field(default=True, description="Write `iscrowd` (False: no crowd annotations either).")
    include_area: bool = Field(default=True, description="Write `area` in annotations.")
    include_annotation_ids: bool = Field(default=True, description="Write annotation `id`s.")

    @field_validator("area_mix")
    @classmethod
    def _sums_to_one(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) < 0 or abs(sum(value) - 1.0) > 1e-6:
            raise ValueError(f"area_mix must be three non-negative shares summing to 1, got {value}")
        return value


@dataclass(frozen=True)
class CocoLikeSplit:
    """Where a generated split lies and what it holds."""

    annotations: Path
    images: Path
    num_images: int
    num_annotations: int


@dataclass
class _Object:
    """One drawn object: its category, full-image masks (bool [H, W]) and clipped outline (px)."""

    category_id: int
    visible: np.ndarray
    full_pixels: int
    outline: np.ndarray | None  # [K, 2] xy, None for a crowd region
    crowd: bool


def category_index(category_id: int) -> int:
    """Position 0..79 of a COCO category id in :data:`CATEGORIES` (raises KeyError for unknown ids)."""
    for index, category in enumerate(CATEGORIES):
        if category["id"] == category_id:
            return index
    raise KeyError(f"not a COCO category id: {category_id}")


def category_look(category_id: int) -> tuple[str, float]:
    """(shape, hue in [0, 1)) that identify a category in the pictures."""
    index = category_index(category_id)
    return SHAPES[index % len(SHAPES)], (index // len(SHAPES)) / NUM_HUES


def size_class(area: float) -> Literal["small", "medium", "large"]:
    """COCO's area ranges: small < 32², large >= 96² (px²)."""
    return "small" if area < SMALL_AREA else ("large" if area >= LARGE_AREA else "medium")


def _rotate(points: np.ndarray, degrees: float) -> np.ndarray:
    rad = math.radians(degrees)
    rotation = np.array([[math.cos(rad), -math.sin(rad)], [math.sin(rad), math.cos(rad)]])
    return points @ rotation.T


def _outline(shape: str, w: float, h: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """(outer outline [K, 2], hole outline [K, 2] or None) of a shape of extent w x h centred at 0."""
    if shape in ("rectangle", "triangle", "cross"):
        return _polygon(shape, w, h, rng), None
    if shape in ("ellipse", "ring"):
        angles = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        unit = np.stack([np.cos(angles), np.sin(angles)], axis=1)
        outer = _rotate(unit * [w / 2, h / 2], rng.uniform(0, 180))
        return outer, (outer * rng.uniform(0.45, 0.7) if shape == "ring" else None)
    if shape == "diamond":
        points = np.array([[0, -h / 2], [w / 2, 0], [0, h / 2], [-w / 2, 0]])
        return _rotate(points, rng.uniform(-15, 15)), None
    corners = 6 if shape == "hexagon" else 10
    angles = np.arange(corners) * 2 * math.pi / corners + rng.uniform(0, 2 * math.pi / corners)
    radius = np.ones(corners) if shape == "hexagon" else np.where(np.arange(corners) % 2 == 0, 1.0, 0.45)
    return np.stack([radius * np.cos(angles) * w / 2, radius * np.sin(angles) * h / 2], axis=1), None


def _rasterize(outer: np.ndarray, hole: np.ndarray | None, width: int, height: int) -> np.ndarray:
    """bool [H, W] mask of a polygon (minus its hole) given in image pixels."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    draw.polygon([tuple(p) for p in outer.tolist()], fill=255)
    if hole is not None:
        draw.polygon([tuple(p) for p in hole.tolist()], fill=0)
    return np.asarray(canvas) > 0


def _category_colour(rng: np.random.Generator, hue: float) -> np.ndarray:
    """A saturated RGB colour (float32 [3], 0..255) close to `hue`."""
    rgb = colorsys.hsv_to_rgb((hue + rng.uniform(-0.02, 0.02)) % 1.0, rng.uniform(0.7, 1.0), rng.uniform(0.6, 1.0))
    return np.array(rgb, dtype=np.float32) * 255


def _paint(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, hue: float) -> None:
    """Fill `mask` (bool [H, W]) of `image` (float32 [H, W, 3], in place) in a colour of the category's hue."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return
    top, left, bottom, right = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
    local = mask[top:bottom, left:right]
    fill = _fill(rng, int(bottom - top), int(right - left), _category_colour(rng, hue))
    image[top:bottom, left:right][local] = fill[local]


def _target_area(rng: np.random.Generator, cfg: CocoLikeConfig, width: int, height: int) -> float:
    """Area (px²) of the next object: a size class drawn by `area_mix`, then log-uniform within the class."""
    shares = np.asarray(cfg.area_mix)
    bucket = int(rng.choice(3, p=shares / shares.sum()))
    low, high = [
        (36.0, SMALL_AREA),
        (SMALL_AREA, LARGE_AREA),
        (LARGE_AREA, max(0.45 * width * height, 2 * LARGE_AREA)),
    ][bucket]
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def _hides_too_much(objects: list[_Object], mask: np.ndarray, max_occlusion: float) -> bool:
    """Would `mask` on top leave an earlier object with less than (1 - max_occlusion) of its pixels?"""
    ys, xs = np.nonzero(mask)
    region = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    local = mask[region]
    for obj in objects:
        hidden = int((obj.visible[region] & local).sum())
        if hidden and int(obj.visible.sum()) - hidden < (1 - max_occlusion) * obj.full_pixels:
            return True
    return False


def _cover(objects: list[_Object], mask: np.ndarray) -> None:
    for obj in objects:
        obj.visible &= ~mask


def _crowd_region(rng: np.random.Generator, image: np.ndarray, objects: list[_Object]) -> None:
    """A crowd: 12-40 small, overlapping instances of one category in one region, kept as one object."""
    height, width = image.shape[:2]
    category_id = int(CATEGORIES[int(rng.integers(0, len(CATEGORIES)))]["id"])
    shape, hue = category_look(category_id)
    region_w, region_h = rng.uniform(0.2, 0.5) * width, rng.uniform(0.15, 0.4) * height
    left, top = rng.uniform(0, width - region_w), rng.uniform(0, height - region_h)
    count = int(rng.integers(12, 41))
    unit = math.sqrt(region_w * region_h / count)
    crowd = np.zeros((height, width), dtype=bool)
    for _ in range(count):
        size = unit * rng.uniform(0.6, 1.3)
        outer, hole = _outline(shape, size * rng.uniform(0.7, 1.2), size, rng)
        centre = np.array([left + rng.uniform(0, region_w), top + rng.uniform(0, region_h)])
        member = _rasterize(outer + centre, hole + centre if hole is not None else None, width, height)
        _paint(image, member, rng, hue)
        crowd |= member
    if crowd.sum() >= _MIN_VISIBLE_PIXELS:
        objects.append(_Object(category_id, crowd, int(crowd.sum()), None, crowd=True))


def _place_objects(rng: np.random.Generator, image: np.ndarray, cfg: CocoLikeConfig) -> list[_Object]:
    """Draw the crowd region (if any) and the objects into `image` (float32 [H, W, 3], in place)."""
    height, width = image.shape[:2]
    objects: list[_Object] = []
    if rng.random() < cfg.crowd_fraction:
        _crowd_region(rng, image, objects)
    if rng.random() < cfg.empty_fraction:
        return objects
    count = min(int(rng.geometric(1.0 / cfg.mean_objects)), cfg.max_objects)
    areas = sorted((_target_area(rng, cfg, width, height) for _ in range(count)), reverse=True)
    for area in areas:  # large first, small on top, as in photos
        for _attempt in range(10):
            category_id = int(CATEGORIES[int(rng.integers(0, len(CATEGORIES)))]["id"])
            shape, hue = category_look(category_id)
            aspect = math.exp(rng.uniform(math.log(0.4), math.log(2.5)))
            w = min(math.sqrt(area * aspect / _FILL_FACTOR[shape]), 1.3 * width)
            h = min(math.sqrt(area / (aspect * _FILL_FACTOR[shape])), 1.3 * height)
            outer, hole = _outline(shape, max(w, 3.0), max(h, 3.0), rng)
            # at most ~30 % of the extent may fall outside the image (COCO has many truncated objects)
            centre = np.array([rng.uniform(0.2 * w, width - 0.2 * w), rng.uniform(0.2 * h, height - 0.2 * h)])
            mask = _rasterize(outer + centre, hole + centre if hole is not None else None, width, height)
            if mask.sum() < _MIN_VISIBLE_PIXELS or _hides_too_much(objects, mask, cfg.max_occlusion):
                continue
            _paint(image, mask, rng, hue)
            _cover(objects, mask)
            clipped = np.clip(outer + centre, [0, 0], [width, height])
            objects.append(_Object(category_id, mask, int(mask.sum()), clipped, crowd=False))
            break
    return objects


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE of a bool [H, W] mask: run lengths in column-major order, starting with 0s."""
    flat = mask.flatten(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).astype(int).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    return {"counts": runs, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _annotation(obj: _Object) -> dict[str, Any] | None:
    """A COCO annotation record (without image_id/id) for a drawn object, or None when too little shows."""
    visible = int(obj.visible.sum())
    if visible < _MIN_VISIBLE_PIXELS:
        return None
    ys, xs = np.nonzero(obj.visible)
    x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
    if obj.outline is not None and visible == obj.full_pixels:  # unhidden: the outline's sub-pixel extent
        (x0, y0), (x1, y1) = obj.outline.min(axis=0), obj.outline.max(axis=0)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    bbox = [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)]
    if obj.crowd:
        segmentation: Any = uncompressed_rle(obj.visible)
    else:
        segmentation = [[round(float(v), 2) for v in obj.outline.reshape(-1)]]
    return {"segmentation": segmentation, "area": float(visible), "iscrowd": int(obj.crowd), "bbox": bbox}


def render_image(rng: np.random.Generator, cfg: CocoLikeConfig) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One COCO-like picture and its annotations.

    Returns:
        (uint8 [H, W, 3], [{"segmentation", "area" (visible px), "iscrowd", "bbox": [x, y, w, h] px floats,
        "category_id"}, ...]).
    """
    sizes = np.array([share for _, _, share in IMAGE_SIZES])
    width, height, _ = IMAGE_SIZES[int(rng.choice(len(IMAGE_SIZES), p=sizes / sizes.sum()))]
    background = _background(rng, height, width)
    grey = background.mean(axis=2, keepdims=True)
    canvas = Image.fromarray((grey + 0.35 * (background - grey)).astype(np.uint8))  # objects carry the colour
    scale = width * height / (160 * 160)  # clutter density of the synthetic dataset
    _clutter(ImageDraw.Draw(canvas), rng, width, height, int(rng.integers(2, 9) * scale**0.5))
    image = np.asarray(canvas, dtype=np.float32).copy()
    objects = _place_objects(rng, image, cfg)
    canvas = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    _clutter(ImageDraw.Draw(canvas), rng, width, height, int(rng.integers(0, 5)))  # over the objects
    if rng.random() < 0.3:
        canvas = canvas.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
    pixels = np.asarray(canvas, dtype=np.float32) + rng.normal(0, rng.uniform(2, 6), size=(height, width, 3))
    annotations = []
    for obj in objects:
        record = _annotation(obj)
        if record is not None:
            annotations.append({**record, "category_id": obj.category_id})
    return np.clip(pixels, 0, 255).astype(np.uint8), annotations


def jpeg_bytes(pixels: np.ndarray, quality: int) -> bytes:
    """Encode uint8 [H, W, 3] as baseline JPEG with fixed settings (identical bytes for identical pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality, subsampling=2, optimize=False)
    return buffer.getvalue()


def _image_record(rng: np.random.Generator, split: str, image_id: int, width: int, height: int) -> dict[str, Any]:
    file_name = f"{image_id:012d}.jpg"
    captured = _CAPTURE_START + timedelta(seconds=int(rng.integers(0, 365 * 24 * 3600)))
    return {
        "license": int(rng.integers(1, len(LICENSES) + 1)),
        "file_name": file_name,
        "coco_url": f"http://images.example.invalid/{split}2017/{file_name}",
        "height": height,
        "width": width,
        "date_captured": captured.strftime("%Y-%m-%d %H:%M:%S"),
        "flickr_url": f"http://farm.example.invalid/{image_id}.jpg",
        "id": image_id,
    }


def _final_annotation(record: dict[str, Any], image_id: int, annotation_id: int, cfg: CocoLikeConfig):
    """The record in COCO's key order, without the keys a third-party export leaves out."""
    full = {
        "segmentation": record["segmentation"],
        "area": record["area"],
        "iscrowd": record["iscrowd"],
        "image_id": image_id,
        "bbox": record["bbox"],
        "category_id": record["category_id"],
        "id": annotation_id,
    }
    kept = {"area": cfg.include_area, "iscrowd": cfg.include_iscrowd, "id": cfg.include_annotation_ids}
    return {k: v for k, v in full.items() if kept.get(k, True)}


def generate_split(root: Path, cfg: CocoLikeConfig, progress: bool = False) -> CocoLikeSplit:
    """Write `root/<split>2017/*.jpg` and `root/annotations/instances_<split>2017.json` (COCO's layout).

    Image ids increase with the index (gaps of 1-3, like COCO's sparse ids; val ids from 1,000,000 on, so
    splits never share ids); annotation ids are image id x 100 + index within the image, crowd ids
    900100000000 + image id.
    """
    image_dir = root / f"{cfg.split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in tqdm(range(cfg.num_images), desc=f"coco-like {cfg.split}", unit="img", disable=not progress):
        rng = np.random.default_rng([cfg.seed, SPLIT_CODES[cfg.split], index])
        image_id = IMAGE_ID_BASE[cfg.split] + 3 * index + 1 + int(rng.integers(0, 3))
        pixels, records = render_image(rng, cfg)
        record = _image_record(rng, cfg.split, image_id, pixels.shape[1], pixels.shape[0])
        (image_dir / record["file_name"]).write_bytes(jpeg_bytes(pixels, cfg.jpeg_quality))
        images.append(record)
        for position, ann in enumerate(records):
            if ann["iscrowd"] and not cfg.include_iscrowd:
                continue  # an exporter without crowd support: the region stays unannotated
            annotation_id = CROWD_ANNOTATION_ID_BASE + image_id if ann["iscrowd"] else image_id * 100 + position
            annotations.append(_final_annotation(ann, image_id, annotation_id, cfg))
    coco = {
        "info": {
            "description": "sd-detr COCO-like synthetic dataset",
            "url": "",
            "version": "1.0",
            "year": 2026,
            "contributor": "sd-detr",
            "date_created": "2026/11/30",
        },
        "licenses": LICENSES,
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    path = root / "annotations" / f"instances_{cfg.split}2017.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(coco, separators=(",", ":")))
    os.replace(tmp, path)
    logger.info("wrote %d images, %d annotations: %s", len(images), len(annotations), path)
    return CocoLikeSplit(path, image_dir, len(images), len(annotations))


def generate(
    root: Path, num_train: int, num_val: int, seed: int = 0, progress: bool = False, **options: bool
) -> dict[str, CocoLikeSplit]:
    """Both splits under `root` (COCO's layout); `options` are the `include_*` switches of the config."""
    return {
        split: generate_split(root, CocoLikeConfig(split=split, num_images=count, seed=seed, **options), progress)
        for split, count in (("train", num_train), ("val", num_val))
    }


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m sd_detr.data.coco_like`: generate both splits; exit 0, or 2 on bad arguments."""
    parser = argparse.ArgumentParser(prog="python -m sd_detr.data.coco_like", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="dataset root (gets annotations/, train2017/, ...)")
    parser.add_argument("--num-train", type=int, default=16, help="train images (default 16)")
    parser.add_argument("--num-val", type=int, default=8, help="val images (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    parser.add_argument("--third-party", action="store_true", help="json without iscrowd, area, annotation ids")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    options = {}
    if args.third_party:
        options = {"include_iscrowd": False, "include_area": False, "include_annotation_ids": False}
    try:
        generate(args.out, args.num_train, args.num_val, args.seed, progress=True, **options)
    except ValueError as error:  # pydantic's ValidationError is a ValueError
        logger.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
