"""The built-in synthetic COCO-format dataset: coloured shapes on textured, cluttered backgrounds.

Five classes (rectangle, ellipse, triangle, cross, ring) with random size (log-uniform), aspect, rotation,
colour and fill (solid, gradient, stripes); 0..`max_objects` objects per image, some images empty; later
objects occlude earlier ones by at most `max_occlusion` of their area; unannotated clutter (lines, arcs,
dots, irregular blobs) under and over the objects; gradient + low-frequency noise + pattern backgrounds
and pixel noise. Boxes are the tight boxes of the *visible* pixels, area the visible pixel count, as in
COCO. Category ids are non-contiguous on purpose (like COCO's), so a label/category-id mix-up fails loudly.

Every image is drawn from its own `numpy.random.Generator` seeded by (seed, split, index), and saved as
PNG with fixed settings, so one seed gives byte-identical json and images.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from sd_detr.data.config import SyntheticConfig

CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "rectangle", "supercategory": "shape"},
    {"id": 3, "name": "ellipse", "supercategory": "shape"},
    {"id": 4, "name": "triangle", "supercategory": "shape"},
    {"id": 7, "name": "cross", "supercategory": "shape"},
    {"id": 9, "name": "ring", "supercategory": "shape"},
]
SPLITS: dict[str, int] = {"train": 0, "val": 1}
IMAGE_ID_OFFSET: dict[str, int] = {"train": 0, "val": 1_000_000}
_MIN_VISIBLE_PIXELS = 24


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def _contrasting_colour(rng: np.random.Generator, reference: np.ndarray, min_distance: float = 90.0) -> np.ndarray:
    """A random RGB colour at least `min_distance` (Euclidean, 0..255 units) from `reference`."""
    colour = _colour(rng)
    for _ in range(20):
        if np.linalg.norm(colour - reference) >= min_distance:
            break
        colour = _colour(rng)
    return colour


def _upsampled_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Smooth noise in [-1, 1], float32 [H, W, 3]: a coarse random grid resized bilinearly."""
    grid = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
    smooth = Image.fromarray(grid).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(smooth, dtype=np.float32) / 127.5 - 1.0


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """float32 [H, W, 3] in 0..255: gradient + low-frequency noise + a random pattern."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = xs * math.cos(angle) + ys * math.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    image = _colour(rng) * (1 - ramp[..., None]) + _colour(rng) * ramp[..., None]
    image += rng.uniform(15, 50) * _upsampled_noise(rng, height, width, int(rng.integers(3, 9)))
    pattern = rng.choice(["none", "stripes", "checker", "blotches"])
    amplitude = rng.uniform(10, 35)
    if pattern == "stripes":
        period, phi = rng.uniform(5, 20), rng.uniform(0, math.pi)
        wave = np.sin(2 * math.pi * (xs * math.cos(phi) + ys * math.sin(phi)) / period)
        image += amplitude * wave[..., None] * rng.uniform(-1, 1, size=3)
    elif pattern == "checker":
        cell = int(rng.integers(6, 20))
        checker = ((xs // cell + ys // cell) % 2) * 2 - 1
        image += amplitude * checker[..., None]
    elif pattern == "blotches":
        image += 1.5 * amplitude * _upsampled_noise(rng, height, width, int(rng.integers(10, 24)))
    return np.clip(image, 0, 255)


def _polygon(kind: str, w: float, h: float, rng: np.random.Generator) -> np.ndarray:
    """Vertices [K, 2] (x, y) of a shape of extent w x h centred at 0, rotated at random."""
    if kind == "rectangle":
        points = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2
        angle = rng.uniform(-15, 15)
    elif kind == "triangle":
        points = np.array([[0, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
        angle = 90 * int(rng.integers(0, 4)) + rng.uniform(-15, 15)
    else:  # cross: a plus sign with arms of relative thickness t
        t = rng.uniform(0.28, 0.45)
        a, b = w / 2, h / 2
        ta, tb = t * a, t * b
        points = np.array(
            [[-ta, -b], [ta, -b], [ta, -tb], [a, -tb], [a, tb], [ta, tb],
             [ta, b], [-ta, b], [-ta, tb], [-a, tb], [-a, -tb], [-ta, -tb]]
        )  # fmt: skip
        angle = rng.uniform(-30, 30)
    rad = math.radians(angle)
    rotation = np.array([[math.cos(rad), -math.sin(rad)], [math.sin(rad), math.cos(rad)]])
    return points @ rotation.T


def _shape_mask(kind: str, w: float, h: float, rng: np.random.Generator) -> np.ndarray:
    """bool [h', w'] mask of one shape in its own tight canvas."""
    if kind in ("ellipse", "ring"):
        canvas = Image.new("L", (math.ceil(w), math.ceil(h)), 0)
        draw = ImageDraw.Draw(canvas)
        draw.ellipse([0, 0, w - 1, h - 1], fill=255)
        if kind == "ring":
            k = rng.uniform(0.45, 0.7)
            dx, dy = (1 - k) * (w - 1) / 2, (1 - k) * (h - 1) / 2
            draw.ellipse([dx, dy, w - 1 - dx, h - 1 - dy], fill=0)
        return np.asarray(canvas) > 0
    points = _polygon(kind, w, h, rng)
    points -= points.min(axis=0)
    extent = np.ceil(points.max(axis=0)).astype(int) + 1
    canvas = Image.new("L", (int(extent[0]), int(extent[1])), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in points], fill=255)
    return np.asarray(canvas) > 0


def _fill(rng: np.random.Generator, height: int, width: int, colour: np.ndarray) -> np.ndarray:
    """float32 [H, W, 3] fill: solid, a gradient towards a second colour, or two-colour stripes."""
    style = rng.choice(["solid", "gradient", "stripes"], p=[0.55, 0.25, 0.2])
    fill = np.broadcast_to(colour, (height, width, 3)).astype(np.float32)
    if style == "solid":
        return fill
    other = np.clip(colour + rng.uniform(-90, 90, size=3), 0, 255)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = xs * math.cos(angle) + ys * math.sin(angle)
    if style == "gradient":
        t = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    else:
        t = (np.floor(ramp / rng.uniform(3, 7)) % 2).astype(np.float32)
    return fill * (1 - t[..., None]) + other * t[..., None]


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int, count: int) -> None:
    """Unannotated distractors: lines, arcs, dots and small irregular blobs."""
    for _ in range(count):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        kind = rng.choice(["line", "arc", "dots", "blob"])
        x, y = float(rng.uniform(0, width)), float(rng.uniform(0, height))
        if kind == "line":
            length, phi = rng.uniform(10, 60), rng.uniform(0, 2 * math.pi)
            end = (x + length * math.cos(phi), y + length * math.sin(phi))
            draw.line([(x, y), end], fill=colour, width=int(rng.integers(1, 4)))
        elif kind == "arc":
            r = rng.uniform(6, 25)
            start = float(rng.uniform(0, 360))
            draw.arc([x - r, y - r, x + r, y + r], start, start + float(rng.uniform(60, 200)), fill=colour, width=2)
        elif kind == "dots":
            for _ in range(int(rng.integers(3, 10))):
                dx, dy, r = rng.uniform(-12, 12), rng.uniform(-12, 12), rng.uniform(1, 2.5)
                draw.ellipse([x + dx - r, y + dy - r, x + dx + r, y + dy + r], fill=colour)
        else:
            k = int(rng.integers(5, 8))
            radii = rng.uniform(3, 10, size=k)
            angles = np.sort(rng.uniform(0, 2 * math.pi, size=k))
            draw.polygon([(x + r * math.cos(a), y + r * math.sin(a)) for r, a in zip(radii, angles, strict=True)],
                         fill=colour)  # fmt: skip


def _place_objects(rng: np.random.Generator, image: np.ndarray, cfg: SyntheticConfig) -> list[tuple[int, np.ndarray]]:
    """Draw the annotated objects into `image` (in place). Returns (category id, visible mask [H, W])."""
    height, width = image.shape[:2]
    empty = rng.random() < cfg.empty_fraction
    count = 0 if empty else int(rng.integers(1, cfg.max_objects + 1))
    objects: list[tuple[int, np.ndarray, int]] = []  # (category id, visible mask, full area)
    for _ in range(count):
        for _attempt in range(25):
            category = CATEGORIES[int(rng.integers(0, len(CATEGORIES)))]
            size = math.exp(rng.uniform(math.log(cfg.min_object_size), math.log(cfg.max_object_size)))
            aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
            w = max(size * math.sqrt(aspect), 4.0)
            h = max(size / math.sqrt(aspect), 4.0)
            local = _shape_mask(category["name"], w, h, rng)
            lh, lw = local.shape
            if lh >= height or lw >= width or local.sum() < _MIN_VISIBLE_PIXELS:
                continue
            top, left = int(rng.integers(0, height - lh + 1)), int(rng.integers(0, width - lw + 1))
            mask = np.zeros((height, width), dtype=bool)
            mask[top : top + lh, left : left + lw] = local
            if any((vis & ~mask).sum() < (1 - cfg.max_occlusion) * full for _, vis, full in objects):
                continue  # would hide too much of an earlier object
            region = (slice(top, top + lh), slice(left, left + lw))
            colour = _contrasting_colour(rng, image[region][local].mean(axis=0))
            image[region][local] = _fill(rng, lh, lw, colour)[local]
            objects = [(cid, vis & ~mask, full) for cid, vis, full in objects]
            objects.append((category["id"], mask, int(mask.sum())))
            break
    return [(cid, vis) for cid, vis, _ in objects]


def render_image(rng: np.random.Generator, cfg: SyntheticConfig) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One synthetic image and its objects.

    Returns:
        (uint8 [H, W, 3], [{"category_id", "bbox": [x, y, w, h] px of the visible pixels, "area": visible
        pixel count}, ...]).
    """
    width = int(rng.integers(cfg.min_image_size, cfg.max_image_size + 1))
    height = int(rng.integers(cfg.min_image_size, cfg.max_image_size + 1))
    low, high = cfg.num_distractors
    canvas = Image.fromarray(_background(rng, height, width).astype(np.uint8))
    _clutter(ImageDraw.Draw(canvas), rng, width, height, int(rng.integers(low, high + 1)))
    image = np.asarray(canvas, dtype=np.float32).copy()
    objects = _place_objects(rng, image, cfg)
    canvas = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    _clutter(ImageDraw.Draw(canvas), rng, width, height, int(rng.integers(0, 3)))  # over the objects
    if rng.random() < 0.3:
        canvas = canvas.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.9))))
    pixels = np.asarray(canvas, dtype=np.float32) + rng.normal(0, rng.uniform(2, 9), size=(height, width, 3))
    annotations = []
    for category_id, visible in objects:
        if visible.sum() < _MIN_VISIBLE_PIXELS:
            continue
        ys, xs = np.nonzero(visible)
        x0, y0 = int(xs.min()), int(ys.min())
        bbox = [float(x0), float(y0), float(xs.max() + 1 - x0), float(ys.max() + 1 - y0)]
        annotations.append({"category_id": category_id, "bbox": bbox, "area": float(visible.sum())})
    return np.clip(pixels, 0, 255).astype(np.uint8), annotations


def png_bytes(pixels: np.ndarray) -> bytes:
    """Encode uint8 [H, W, 3] as PNG with fixed settings (byte-identical for identical pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def generate_split(root: Path, split: str, cfg: SyntheticConfig, progress: bool = False) -> Path:
    """Write `root/images/<split>/*.png` and `root/annotations/instances_<split>.json`; returns the json path."""
    count = cfg.num_train if split == "train" else cfg.num_val
    image_dir = root / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in tqdm(range(count), desc=f"synthetic {split}", unit="img", disable=not progress):
        rng = np.random.default_rng([cfg.seed, SPLITS[split], index])
        pixels, objects = render_image(rng, cfg)
        image_id = IMAGE_ID_OFFSET[split] + index + 1
        file_name = f"{image_id:08d}.png"
        (image_dir / file_name).write_bytes(png_bytes(pixels))
        images.append({"id": image_id, "file_name": file_name, "height": pixels.shape[0], "width": pixels.shape[1]})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0, **obj})
    coco = {
        "info": {"description": f"sd-detr synthetic shapes, split {split}", "version": "1"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    path = root / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco, sort_keys=True, separators=(",", ":")))
    return path
