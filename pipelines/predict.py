"""Detect objects in image files with a registered (or checkpointed) SD-DETR model.

    python pipelines/predict.py --model models:/sd-detr-synthetic@champion --images photos/ --out detections.json
    python pipelines/predict.py --model models:/sd-detr-synthetic/3 --images a.jpg b.png --out d.json --draw drawn/
    python pipelines/predict.py --config predict.yaml --set score_threshold=0.3

Options are the fields of `PredictConfig`, read like `pipelines/train.py`'s: `--config FILE` (repeatable),
then the flags below (each sets the field of its name), then `--set field=value` overrides.

Writes COCO-results JSON (``image_id`` = position in the sorted input list, ``file_name`` added) and,
with ``--draw``, PNGs with the boxes drawn (after the JSON is written, so a drawing failure loses no
detection). Many images (``--ray-min-images``) run as Ray Data batch inference with the model loaded once
per actor.

Images are decoded by the project's one decoder (``sd_detr.data.samples.decode_image``), so prediction
treats every file as training did: the stored pixel grid without EXIF rotation (boxes refer to the stored
pixels), grayscale / palette / CMYK / 16-bit converted to 8-bit RGB, and files over the decompression-bomb
limit or that do not decode skipped and listed (docs/data.md, "Image formats").
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torchvision.io import write_png

from pipelines.cli import add_config_arguments, configure_logging, fail, flag_fields, load_or_exit
from pipelines.inference import LoadedModel, Predictor, list_images, load_model
from sd_detr.box_ops import xyxy_to_xywh
from sd_detr.data.samples import decode_image
from sd_detr.diagnostics import draw_boxes

logger = logging.getLogger("pipelines.predict")  # by name: run as a script, __name__ is "__main__"


class PredictConfig(BaseModel):
    """Options of `pipelines/predict.py`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="models:/<name>@<alias>, models:/<name>/<version> or a checkpoint directory.")
    images: list[Path] = Field(min_length=1, description="Image files and/or folders.")
    out: Path = Field(description="COCO-results JSON to write.")
    draw: Path | None = Field(None, description="Folder for images with drawn detections.")
    score_threshold: float = Field(0.0, ge=0.0, le=1.0, description="Keep detections at or above this score.")
    batch_size: int = Field(8, gt=0, description="Images per forward pass.")
    ray_min_images: int = Field(256, gt=0, description="From this many images on, use Ray Data batch inference.")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI).")


def detections_to_results(file_name: str, image_id: int, detection: dict, threshold: float) -> list[dict]:
    """COCO results entries (xywh pixels) of one image's detections above ``threshold``."""
    keep = detection["scores"] >= threshold
    boxes = xyxy_to_xywh(detection["boxes"][keep]).tolist()
    return [
        {"image_id": image_id, "file_name": file_name, "category_id": int(c), "bbox": b, "score": float(s)}
        for c, b, s in zip(detection["labels"][keep].tolist(), boxes, detection["scores"][keep].tolist(), strict=True)
    ]


def predict_local(predictor: Predictor, files: list[Path], batch_size: int) -> list[dict | None]:
    """Detections per file, in order, in this process."""
    detections: list[dict | None] = []
    for start in range(0, len(files), batch_size):
        detections.extend(predictor([path.read_bytes() for path in files[start : start + batch_size]]))
    return detections


class _RayPredictor:
    """Ray Data actor UDF: the model is loaded once per actor."""

    def __init__(self, source: str, tracking_uri: str | None) -> None:
        self.predictor = Predictor(load_model(source, tracking_uri))

    def __call__(self, batch: dict) -> dict:
        detections = self.predictor([Path(p).read_bytes() for p in batch["path"]])
        encoded = [json.dumps(None if d is None else {k: v.tolist() for k, v in d.items()}) for d in detections]
        return {"path": batch["path"], "detections": encoded}


def predict_with_ray(cfg: PredictConfig, files: list[Path]) -> list[dict | None]:
    """Detections per file via Ray Data ``map_batches`` over an actor pool (order kept)."""
    import ray

    if not ray.is_initialized():
        ray.init()
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    dataset = ray.data.from_items([{"path": str(p.resolve())} for p in files])
    output = dataset.map_batches(
        _RayPredictor, fn_constructor_args=(cfg.model, cfg.tracking_uri), batch_size=cfg.batch_size,
        concurrency=1, batch_format="numpy",
    ).take_all()  # fmt: skip
    by_path = {row["path"]: json.loads(row["detections"]) for row in output}
    decoded = [by_path[str(p.resolve())] for p in files]
    return [None if d is None else {k: torch.tensor(v) for k, v in d.items()} for d in decoded]


def drawing_names(files: list[Path]) -> list[str]:
    """The drawing's file name per image: ``<stem>.png``, or ``<stem>_<index>.png`` (index in ``files``) for
    every image whose stem another image shares (``a/x.jpg`` and ``b/x.jpg``, ``x.jpg`` and ``x.png``)."""
    stems = Counter(path.stem for path in files)
    return [f"{p.stem}.png" if stems[p.stem] == 1 else f"{p.stem}_{index}.png" for index, p in enumerate(files)]


def draw(path: Path, detection: dict, loaded: LoadedModel, threshold: float, out_file: Path) -> None:
    """Save ``out_file`` (PNG) with the detections above ``threshold`` drawn (on the pixels the model saw)."""
    pixels, _ = decode_image(path.read_bytes())
    image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
    keep = detection["scores"] >= max(threshold, 1e-9)
    names = dict(zip(loaded.category_ids, loaded.category_names, strict=True))
    labels = [
        f"{names.get(int(c), c)} {s:.2f}"
        for c, s in zip(detection["labels"][keep], detection["scores"][keep], strict=True)
    ]
    out_file.parent.mkdir(parents=True, exist_ok=True)
    write_png(draw_boxes(image, detection["boxes"][keep], labels=labels, colors="red"), str(out_file))


def run(cfg: PredictConfig) -> list[dict]:
    """Predict, write the JSON (and drawings); returns the results entries."""
    files = list_images(cfg.images)
    if not files:
        raise FileNotFoundError(f"no images found in {[str(p) for p in cfg.images]}")
    loaded = load_model(cfg.model, cfg.tracking_uri)
    if len(files) >= cfg.ray_min_images:
        detections = predict_with_ray(cfg, files)
    else:
        detections = predict_local(Predictor(loaded), files, cfg.batch_size)
    results, unreadable = [], []
    for image_id, (path, detection) in enumerate(zip(files, detections, strict=True)):
        if detection is None:
            unreadable.append(str(path))
            continue
        results.extend(detections_to_results(path.name, image_id, detection, cfg.score_threshold))
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(results))
    logger.info("%d images, %d detections -> %s", len(files) - len(unreadable), len(results), cfg.out)
    if unreadable:
        logger.warning("skipped %d unreadable images: %s", len(unreadable), unreadable[:10])
    if cfg.draw is not None:
        for path, detection, name in zip(files, detections, drawing_names(files), strict=True):
            if detection is not None:
                draw(path, detection, loaded, cfg.score_threshold, cfg.draw / name)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, None)
    parser.add_argument("--model", help="sets model (required here or in a config)")
    parser.add_argument("--images", nargs="+", help="sets images (required here or in a config)")
    parser.add_argument("--out", help="sets out (required here or in a config)")
    parser.add_argument("--draw", help="sets draw")
    parser.add_argument("--score-threshold", type=float, help="sets score_threshold (default 0.0)")
    parser.add_argument("--batch-size", type=int, help="sets batch_size (default 8)")
    parser.add_argument("--ray-min-images", type=int, help="sets ray_min_images (default 256)")
    parser.add_argument("--tracking-uri", help="sets tracking_uri")
    args = parser.parse_args(argv)
    configure_logging()
    fields = flag_fields(args, [name for name in PredictConfig.model_fields if name in vars(args)])
    cfg = load_or_exit(PredictConfig, args.config, args.set, None, fields)
    try:
        run(cfg)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))


if __name__ == "__main__":
    main()
