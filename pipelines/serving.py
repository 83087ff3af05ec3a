"""The registered SD-DETR model as an MLflow pyfunc model, logged with MLflow's models-from-code.

The logged model holds a code file (`pipelines/serving_model.py`, which builds :class:`SdDetrPyfuncModel`
from the installed project), the weights as safetensors and the config, categories and eval transform as
JSON (`pipelines/model_artifact.py`). Nothing in it is pickled, so it loads with
``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``.

Input of ``predict`` (a pandas DataFrame, one row per image; over HTTP: ``{"dataframe_split": ...}``):

    image   binary, optional   the encoded file (JPEG, PNG, ...); over HTTP a base64 string
    path    string, optional   a file under the folder that ``SD_DETR_INPUT_ROOT`` names in the process that
                               runs the model (local or batch use); refused when that variable is not set, so
                               a served model reads no file a client names

Each row gives exactly one of the two; at most :data:`MAX_ROWS` rows and :data:`MAX_INPUT_BYTES` of images a
call, each image at most :data:`MAX_IMAGE_BYTES`. Params (optional): ``score_threshold`` (double, default 0.0: keep
detections at or above it) and ``top_k`` (long, default 100: detections per image before the threshold).

Output: a DataFrame, one row per detection, images in input order, scores descending within an image:

    image_index     long     row of the input
    file_name       string   the file name of ``path`` rows, "" for ``image`` rows
    category_id     long     COCO category id
    category_name   string
    score           double   in [0, 1]
    bbox            [double] COCO ``[x, y, width, height]`` in pixels of the original image

A row whose bytes are not a decodable image, whose path is refused or missing, or a call over the limits fails
the whole call with an
``INVALID_PARAMETER_VALUE`` error that names the rows (HTTP 400 from ``mlflow models serve``).
"""

from __future__ import annotations

import importlib.metadata
import io
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array
from PIL import Image

from pipelines.inference import Predictor
from pipelines.model_artifact import LoadedModel, read_model_files
from sd_detr.box_ops import xyxy_to_xywh

logger = logging.getLogger(__name__)

MODEL_CODE_FILE = Path(__file__).with_name("serving_model.py")
"""The models-from-code file MLflow stores with the model and runs at load time."""
IMAGE_COLUMN = "image"
PATH_COLUMN = "path"
OUTPUT_COLUMNS = ["image_index", "file_name", "category_id", "category_name", "score", "bbox"]
DEFAULT_TOP_K = 100
PREDICT_CHUNK = 8
"""Images per forward pass inside one ``predict`` call."""
MAX_ROWS = 256
"""Images per ``predict`` call (one HTTP request): a served model's thread cannot be stopped once started."""
MAX_IMAGE_BYTES = 32 * 1024**2
"""Encoded bytes of one image (a 50-megapixel JPEG is about 20 MiB)."""
MAX_INPUT_BYTES = 256 * 1024**2
"""Encoded bytes of all images of one call."""
INPUT_ROOT_ENV = "SD_DETR_INPUT_ROOT"
"""The folder whose files ``path`` rows may name; unset (the default): ``path`` rows are refused."""
_REQUIREMENTS = ("torch", "torchvision", "safetensors", "pillow", "numpy", "pandas", "pydantic", "mlflow")

SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec(DataType.binary, IMAGE_COLUMN, required=False),
            ColSpec(DataType.string, PATH_COLUMN, required=False),
        ]
    ),
    outputs=Schema(
        [
            ColSpec(DataType.long, "image_index"),
            ColSpec(DataType.string, "file_name"),
            ColSpec(DataType.long, "category_id"),
            ColSpec(DataType.string, "category_name"),
            ColSpec(DataType.double, "score"),
            ColSpec(Array(DataType.double), "bbox"),
        ]
    ),
    params=ParamSchema(
        [ParamSpec("score_threshold", DataType.double, 0.0), ParamSpec("top_k", DataType.long, DEFAULT_TOP_K)]
    ),
)


def _bad_input(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _read_path(path: str, root: Path | None) -> bytes:
    """The bytes of ``path`` if it is a regular file inside ``root`` (symbolic links resolved) of at most
    :data:`MAX_IMAGE_BYTES`; raises ``ValueError`` saying why not."""
    if root is None:
        raise ValueError(f"'{PATH_COLUMN}' inputs are off: set {INPUT_ROOT_ENV} to the folder they may read from")
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(root):
        raise ValueError(f"{path!r} is outside {INPUT_ROOT_ENV} ({root})")
    if not resolved.is_file():
        raise ValueError(f"{path!r} is not a file")
    if resolved.stat().st_size > MAX_IMAGE_BYTES:
        raise ValueError(f"{path!r} is larger than {MAX_IMAGE_BYTES} bytes")
    return resolved.read_bytes()


def input_root() -> Path | None:
    """The resolved folder of :data:`INPUT_ROOT_ENV`, or None when it is unset or empty."""
    value = os.environ.get(INPUT_ROOT_ENV, "").strip()
    return Path(value).resolve() if value else None


def read_inputs(frame: pd.DataFrame, root: Path | None = None) -> tuple[list[bytes], list[str]]:
    """(encoded bytes, file name) per row of an input frame (see the module docstring); ``path`` rows are read
    only inside ``root`` (None: refused).

    Raises:
        MlflowException (INVALID_PARAMETER_VALUE): unknown columns, more than :data:`MAX_ROWS` rows, a row with
        neither or both of ``image``/``path``, a refused or unreadable path, an image over
        :data:`MAX_IMAGE_BYTES`, all images over :data:`MAX_INPUT_BYTES`.
    """
    if not isinstance(frame, pd.DataFrame):
        raise _bad_input(
            f"expected a DataFrame with an '{IMAGE_COLUMN}' and/or '{PATH_COLUMN}' column, got {type(frame)}"
        )
    unknown = sorted(set(map(str, frame.columns)) - {IMAGE_COLUMN, PATH_COLUMN})
    if unknown or not len(frame.columns):
        raise _bad_input(f"input columns must be '{IMAGE_COLUMN}' and/or '{PATH_COLUMN}', got {list(frame.columns)}")
    if len(frame) > MAX_ROWS:
        raise _bad_input(f"{len(frame)} rows: at most {MAX_ROWS} images a call (split the input)")
    images = frame[IMAGE_COLUMN].tolist() if IMAGE_COLUMN in frame else [None] * len(frame)
    paths = frame[PATH_COLUMN].tolist() if PATH_COLUMN in frame else [None] * len(frame)
    encoded, names, problems = [], [], []
    for row, (image, path) in enumerate(zip(images, paths, strict=True)):
        has_image, has_path = not _is_missing(image), not _is_missing(path)
        if has_image == has_path:
            problems.append(f"row {row}: give exactly one of '{IMAGE_COLUMN}' and '{PATH_COLUMN}'")
            encoded.append(b"")
        elif has_image:
            if not isinstance(image, (bytes, bytearray)):
                problems.append(f"row {row}: '{IMAGE_COLUMN}' must be bytes (base64 over HTTP), got {type(image)}")
            elif len(image) > MAX_IMAGE_BYTES:
                problems.append(f"row {row}: {len(image)} bytes, more than {MAX_IMAGE_BYTES} for one image")
            encoded.append(bytes(image) if isinstance(image, (bytes, bytearray)) else b"")
        else:
            try:
                encoded.append(_read_path(str(path), root))
            except ValueError as error:
                problems.append(f"row {row}: {error}")
                encoded.append(b"")
            except OSError as error:
                problems.append(f"row {row}: cannot read {path!r} ({error.strerror or error})")
                encoded.append(b"")
        if sum(map(len, encoded)) > MAX_INPUT_BYTES:
            raise _bad_input(f"more than {MAX_INPUT_BYTES} bytes of images by row {row}: split the input")
        names.append(Path(str(path)).name if has_path and not has_image else "")
    if problems:
        raise _bad_input("; ".join(problems[:20]) + (f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""))
    return encoded, names


def detections_frame(
    detections: list[dict[str, torch.Tensor]], names: list[str], category_names: Mapping[int, str], threshold: float
) -> pd.DataFrame:
    """The output DataFrame (module docstring) of per-image detections (``boxes`` xyxy original px)."""
    rows: dict[str, list] = {column: [] for column in OUTPUT_COLUMNS}
    for index, (detection, name) in enumerate(zip(detections, names, strict=True)):
        keep = detection["scores"] >= threshold
        boxes = xyxy_to_xywh(detection["boxes"][keep]).double().tolist()
        for category_id, score, box in zip(
            detection["labels"][keep].tolist(), detection["scores"][keep].double().tolist(), boxes, strict=True
        ):
            rows["image_index"].append(index)
            rows["file_name"].append(name)
            rows["category_id"].append(int(category_id))
            rows["category_name"].append(category_names.get(int(category_id), ""))
            rows["score"].append(float(score))
            rows["bbox"].append([float(v) for v in box])
    frame = pd.DataFrame(rows, columns=OUTPUT_COLUMNS)
    return frame.astype({"image_index": "int64", "category_id": "int64", "score": "float64"})


class SdDetrPyfuncModel(PythonModel):
    """MLflow pyfunc wrapper of a registered detector: images in, COCO-style detections out.

    ``load_context`` builds the model from the safetensors + JSON artifacts with the installed project's code
    (on CUDA when available); ``predict`` takes and returns the DataFrames described in the module docstring.
    """

    def __init__(self) -> None:
        self.loaded: LoadedModel | None = None
        self.predictor: Predictor | None = None
        self.input_root: Path | None = None

    def load_context(self, context: PythonModelContext) -> None:
        self.loaded = read_model_files(context.artifacts)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.predictor = Predictor(self.loaded, device=device, top_k=DEFAULT_TOP_K)
        self.input_root = input_root()
        logger.info("SD-DETR pyfunc model loaded on %s (%d categories)", device, len(self.loaded.category_ids))

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        if self.predictor is None or self.loaded is None:
            raise MlflowException("the model was not loaded (load_context was not called)")
        params = params or {}
        threshold = float(params.get("score_threshold", 0.0))
        top_k = int(params.get("top_k", DEFAULT_TOP_K))
        if not 0.0 <= threshold <= 1.0 or top_k <= 0:
            raise _bad_input(f"score_threshold must lie in [0, 1] and top_k be positive, got {threshold}, {top_k}")
        encoded, names = read_inputs(model_input, self.input_root)
        detections: list[dict[str, torch.Tensor] | None] = []
        for start in range(0, len(encoded), PREDICT_CHUNK):  # top_k per call: requests run in parallel threads
            detections.extend(self.predictor(encoded[start : start + PREDICT_CHUNK], top_k=top_k))
        unreadable = [row for row, detection in enumerate(detections) if detection is None]
        if unreadable:
            raise _bad_input(f"rows {unreadable[:20]} are not decodable images (JPEG, PNG, BMP, WebP, ...)")
        category_names = dict(zip(self.loaded.category_ids, self.loaded.category_names, strict=True))
        return detections_frame(detections, names, category_names, threshold)


def example_image(width: int = 96, height: int = 64) -> bytes:
    """A small PNG (a light square on a dark background), for input examples when no dataset image is at hand."""
    pixels = np.full((height, width, 3), 30, dtype=np.uint8)
    pixels[height // 4 : 3 * height // 4, width // 3 : 2 * width // 3] = (220, 200, 40)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def pip_requirements() -> list[str]:
    """Pinned versions of the third-party packages the model code imports, as installed here.

    The model code also needs the sd-detr project itself installed (``pip install .``), which is why serving
    uses ``--env-manager local`` in the project's environment.
    """
    requirements = []
    for package in _REQUIREMENTS:
        try:
            version = importlib.metadata.version(package).split("+")[0]
        except importlib.metadata.PackageNotFoundError:
            continue
        requirements.append(f"{package}=={version}")
    return requirements


def log_pyfunc_model(
    artifact_paths: Mapping[str, str],
    input_image: bytes,
    registered_model_name: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> ModelInfo:
    """Log (and optionally register) the pyfunc model to the active MLflow run, as ``model``.

    Args:
        artifact_paths: the files of :func:`pipelines.model_artifact.write_model_files`.
        input_image: encoded bytes of one image, stored as the input example (MLflow checks that the
            model serves it before logging).
        registered_model_name: register the logged model as a new version of this name.
        metadata: extra entries for the MLmodel file (JSON-serializable).
    """
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(MODEL_CODE_FILE),
        artifacts=dict(artifact_paths),
        signature=SIGNATURE,
        input_example=pd.DataFrame({IMAGE_COLUMN: [input_image]}),
        pip_requirements=pip_requirements(),
        registered_model_name=registered_model_name,
        metadata=metadata,
    )
