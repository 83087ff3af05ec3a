"""`pipelines/predict.py` on real-world files: each image kind of docs/data.md ("Image formats") gets the
same outcome as in the converter, and the JSON is written before anything is drawn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pipelines.predict as predict_module
from pipelines.inference import LoadedModel
from pipelines.predict import PredictConfig, run
from sd_detr.config import SDDetrModelConfig, TransformerConfig
from sd_detr.data.config import AugmentationConfig
from sd_detr.model import build_detector
from tests.test_data_real_world import format_corpus

# Stored (width, height) of each file the decoder accepts: boxes must lie inside the *stored* pixel grid
# (no EXIF rotation), whatever the json or the EXIF tag says.
DECODABLE = {
    "gray16.png": (48, 40),
    "rgb16.png": (48, 40),
    "cmyk.jpg": (40, 30),
    "gray.jpg": (30, 20),
    "exif6.jpg": (60, 40),
    "exif6_json_rotated.jpg": (60, 40),
    "rgba.png": (20, 20),
    "palette.png": (20, 20),
}
REFUSED = {"bomb_warn.png", "bomb_error.png"}  # over the decompression-bomb limit: skipped and listed


@pytest.fixture(scope="module")
def tiny_loaded_model() -> LoadedModel:
    """A random, tiny SD-DETR (TAQ on: its fill slots cover the 1-cell maps of these small images)."""
    config = SDDetrModelConfig(
        num_classes=1,
        num_queries=5,
        backbone={"name": "resnet18", "norm": "group_norm", "trainable_layers": 5, "pretrained": False},
        transformer=TransformerConfig(
            d_model=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=2, ffn_dim=64, dropout=0.0
        ),
    )
    augmentation = AugmentationConfig(eval_size=64, eval_max_size=128)
    return LoadedModel(build_detector(config, seed=0).eval(), [1], ["thing"], augmentation)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for record in format_corpus():
        (folder / record["file_name"]).write_bytes(record["_bytes"])
    return folder


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_each_image_kind_has_its_documented_outcome(
    tiny_loaded_model: LoadedModel, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    monkeypatch.setattr(predict_module, "load_model", lambda source, uri=None: tiny_loaded_model)
    out = tmp_path / "out" / "detections.json"
    cfg = PredictConfig(model="models:/tiny@champion", images=[image_folder], out=out, draw=tmp_path / "drawn")
    with caplog.at_level("WARNING", logger="pipelines.predict"):
        results = run(cfg)

    written = json.loads(out.read_text())
    assert written == results
    predicted = {r["file_name"] for r in written}
    assert predicted == set(DECODABLE), "every decodable kind is predicted, the bombs are not"
    for entry in written:
        width, height = DECODABLE[entry["file_name"]]
        x, y, w, h = entry["bbox"]
        assert x >= -1e-3 and x + w <= width + 1e-3 and y >= -1e-3 and y + h <= height + 1e-3, entry
    skipped = " ".join(record.getMessage() for record in caplog.records)
    assert all(name in skipped for name in REFUSED), skipped
    drawn = {p.name for p in (tmp_path / "drawn").iterdir()}
    assert drawn == {f"{Path(name).stem}.png" for name in DECODABLE}


def test_json_is_written_before_drawing(
    tiny_loaded_model: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    record = next(r for r in format_corpus() if r["file_name"] == "cmyk.jpg")
    (folder / "cmyk.jpg").write_bytes(record["_bytes"])
    monkeypatch.setattr(predict_module, "load_model", lambda source, uri=None: tiny_loaded_model)

    def failing_draw(*args, **kwargs) -> None:
        raise OSError("disk full while drawing")

    monkeypatch.setattr(predict_module, "draw", failing_draw)
    out = tmp_path / "detections.json"
    with pytest.raises(OSError, match="disk full"):
        run(PredictConfig(model="models:/tiny@champion", images=[folder], out=out, draw=tmp_path / "drawn"))
    detections = json.loads(out.read_text())
    assert detections and {d["file_name"] for d in detections} == {"cmyk.jpg"}
    assert all(torch.isfinite(torch.tensor(d["bbox"])).all() for d in detections)


def test_drawing_no_box_returns_the_image_without_a_warning(recwarn: pytest.WarningsRecorder) -> None:
    from sd_detr.diagnostics import draw_boxes

    pixels = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    assert draw_boxes(pixels, torch.zeros(0, 4), colors="red") is pixels
    drawn = draw_boxes(pixels, torch.tensor([[2.0, 3.0, 12.0, 15.0]]), colors="red", width=1)
    assert drawn.shape == pixels.shape and not torch.equal(drawn, pixels)
    assert not [w for w in recwarn if "box" in str(w.message)]


def test_drawings_of_images_that_share_a_stem_do_not_overwrite_each_other() -> None:
    from pipelines.predict import drawing_names

    files = [Path("a/x.jpg"), Path("b/x.jpg"), Path("x.png"), Path("y.jpg")]
    assert drawing_names(files) == ["x_0.png", "x_1.png", "x_2.png", "y.png"]
