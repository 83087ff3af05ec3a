"""Names shared across layers, defined once: loss terms, per-output loss keys, and the metric names the
training loop logs and the tuner, checkpoint scoring and model registry read back.

Metric names are ``<split>_<name>``: ``train_loss``, ``train_loss_class``, ``val_AP``, ``val_AP50``, ...
"""

from __future__ import annotations

# ---- loss terms (keys of one output's term dict, see sd_detr.losses) ---------------------------------------

CLASS_TERM = "class"
BBOX_TERM = "bbox"
GIOU_TERM = "giou"
ALIGN_TERM = "align"
LOSS_TERMS = (CLASS_TERM, BBOX_TERM, GIOU_TERM, ALIGN_TERM)

# ---- per-output keys of LossOutput.per_output -------------------------------------------------------------

LAYER_PREFIX = "layer_"
ENCODER_OUTPUT = "encoder"


def layer_key(index: int) -> str:
    """Key of decoder layer ``index`` (0-based, first layer 0): ``layer_<index>``."""
    return f"{LAYER_PREFIX}{index}"


def layer_index(key: str) -> int | None:
    """Decoder layer index of a per-output key, or None for keys that are not a decoder layer (``encoder``)."""
    if not key.startswith(LAYER_PREFIX):
        return None
    suffix = key.removeprefix(LAYER_PREFIX)
    return int(suffix) if suffix.isdigit() else None


# ---- metrics -----------------------------------------------------------------------------------------------

TRAIN_PREFIX = "train_"
VAL_PREFIX = "val_"
LOSS = "loss"


def train_metric(name: str) -> str:
    """``train_<name>``, e.g. ``train_metric("loss") == "train_loss"``."""
    return f"{TRAIN_PREFIX}{name}"


def val_metric(name: str) -> str:
    """``val_<name>``, e.g. ``val_metric("AP") == "val_AP"``."""
    return f"{VAL_PREFIX}{name}"


def loss_metric(term: str | None = None) -> str:
    """Name of the running loss before the split prefix: ``loss`` (weighted total) or ``loss_<term>``."""
    return LOSS if term is None else f"{LOSS}_{term}"


VAL_AP = val_metric("AP")
VAL_AP50 = val_metric("AP50")
VAL_IMAGES = val_metric("images")
VAL_CORRUPT_IMAGES = val_metric("corrupt_images")
VAL_PREDICT_SECONDS = val_metric("predict_seconds")
VAL_SECONDS = val_metric("seconds")
TRAIN_LOSS = train_metric(LOSS)
TRAIN_IMAGES_PER_S = train_metric("images_per_s")
TRAIN_CORRUPT_IMAGES = train_metric("corrupt_images")
TRAIN_EPOCH_SECONDS = train_metric("epoch_seconds")
TRAIN_DATA_WAIT_S = train_metric("data_wait_s")
TRAIN_FIRST_BATCH_S = train_metric("first_batch_s")
BEST_VAL_AP = f"best_{VAL_AP}"
