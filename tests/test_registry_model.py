"""Registered models without pickle: the safetensors + JSON files, the MLflow pyfunc model (models-from-code)
loaded by alias with pickle deserialization off, `mlflow models serve` answering a real HTTP request, the
pipeline's own loaders (predict.py local and Ray Data, evaluate.py) reading the same artifact, and the champion
alias rules (only "no such alias" means "no champion"; the alias is re-read after it is set)."""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient

from pipelines.inference import Predictor, list_images, load_model, load_registered_model
from pipelines.mlflow_uris import fluent_uris
from pipelines.model_artifact import FILE_NAMES, ModelArtifactError, read_model_files
from pipelines.serving import (
    INPUT_ROOT_ENV,
    MAX_IMAGE_BYTES,
    MAX_ROWS,
    PREDICT_CHUNK,
    SdDetrPyfuncModel,
    example_image,
    read_inputs,
)
from pipelines.tags import AP_TAG
from pipelines.tracking import AliasNotMovedError, AliasUpdateError, update_alias
from sd_detr.box_ops import xyxy_to_xywh
from sd_detr.config import DetectorConfig
from sd_detr.data.meta import load_meta
from sd_detr.names import VAL_PREDICT_SECONDS, VAL_SECONDS, val_metric
from tests.mlflow_server import LOOPBACK, free_loopback_port, http_get, mlflow_executable
from tests.registry_helpers import register_tiny_model, tiny_model_files, unique

REPO = Path(__file__).resolve().parents[1]
SERVE_STARTUP_S = 180.0


@pytest.fixture
def no_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every load in the test runs with MLflow's pickle deserialization switched off."""
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")


@pytest.fixture
def registry_uri(mlflow_server: str) -> Iterator[str]:
    """The session server as the fluent API's tracking and registry URI for one test."""
    with fluent_uris(mlflow_server):
        yield mlflow_server


def _images(count: int = 2) -> list[bytes]:
    return [example_image(96, 64), example_image(50, 80)][:count]


def _expected_rows(loaded, images: list[bytes], top_k: int) -> list[tuple]:
    """(image index, category id, score, COCO xywh box) of the in-process Predictor, in output order."""
    rows = []
    for index, detection in enumerate(Predictor(loaded, top_k=top_k)(images)):
        labels, scores = detection["labels"].tolist(), detection["scores"].tolist()
        boxes = xyxy_to_xywh(detection["boxes"]).tolist()
        rows += [(index, c, s, b) for c, s, b in zip(labels, scores, boxes, strict=True)]
    return rows


def _assert_same_detections(frame: pd.DataFrame, expected: list[tuple]) -> None:
    assert len(frame) == len(expected) > 0
    for (_, row), (index, category_id, score, box) in zip(frame.iterrows(), expected, strict=True):
        assert (row["image_index"], row["category_id"]) == (index, category_id)
        assert row["score"] == pytest.approx(score, abs=1e-5)
        assert list(row["bbox"]) == pytest.approx(box, abs=1e-3)


# --- the files -------------------------------------------------------------------------------------------


def test_model_files_round_trip_without_pickle(tmp_path: Path) -> None:
    paths, loaded = tiny_model_files(tmp_path / "model")
    assert {Path(p).name for p in paths.values()} == set(FILE_NAMES.values())
    config = DetectorConfig.model_validate_json(Path(paths["detector_config"]).read_text())
    assert config.model.num_classes == 3 and config.model.backbone.weights_path is None
    assert json.loads(Path(paths["categories"]).read_text()) == [
        {"id": 1, "name": "circle"}, {"id": 3, "name": "square"}, {"id": 7, "name": "triangle"},
    ]  # fmt: skip
    assert Path(paths["weights"]).read_bytes()[8:9] == b"{"  # safetensors: a JSON header, no pickle opcode
    again = read_model_files(paths)
    for (name, ours), (_, theirs) in zip(
        loaded.model.state_dict().items(), again.model.state_dict().items(), strict=True
    ):
        assert torch.equal(ours, theirs), name
    assert loaded.category_ids == [1, 3, 7] and loaded.augmentation.eval_size == 128


def test_model_files_saved_before_a_config_field_existed_load_as_they_were_trained(tmp_path: Path) -> None:
    """An artifact written before ``model.taq_proposal_size`` existed was trained with the then built-in cell
    proposals of side 0.05: it must load with 0.05, not with today's default (which would move its boxes)."""
    paths, loaded = tiny_model_files(tmp_path / "model")
    config_file = Path(paths["detector_config"])
    saved = json.loads(config_file.read_text())
    assert saved["model"]["taq_proposal_size"] == 0.2 == loaded.model.config.taq_proposal_size
    del saved["model"]["taq_proposal_size"]
    config_file.write_text(json.dumps(saved))
    old = read_model_files(paths)
    assert old.model.config.taq_proposal_size == 0.05
    assert old.model.decoding.query_generator.proposal_size == 0.05
    images = _images()
    new_rows, old_rows = _expected_rows(loaded, images, top_k=5), _expected_rows(old, images, top_k=5)
    assert [row[3] for row in new_rows] != [row[3] for row in old_rows]  # the proposal side reaches the boxes


def test_a_backbone_weights_path_in_the_model_config_is_never_opened(tmp_path: Path) -> None:
    """The safetensors file holds the whole trained model: a ``weights_path`` in its JSON config (from the
    training machine, or any file a registrant names) is not read when the model loads."""
    paths, loaded = tiny_model_files(tmp_path / "model")
    config_file = Path(paths["detector_config"])
    saved = json.loads(config_file.read_text())
    not_weights = tmp_path / "not-weights.pth"
    not_weights.write_text("a file the loader must not open")
    saved["model"]["backbone"].update(weights_path=str(not_weights), pretrained=True)
    config_file.write_text(json.dumps(saved))
    again = read_model_files(paths)
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], tensor), name


def test_weights_that_do_not_fit_the_config_are_a_clear_error(tmp_path: Path) -> None:
    paths, _ = tiny_model_files(tmp_path / "a")
    other, _ = tiny_model_files(tmp_path / "b", categories=[(1, "a"), (2, "b")])
    with pytest.raises(ModelArtifactError, match="do not fit the detector config"):
        read_model_files({**paths, "weights": other["weights"]})
    with pytest.raises(ModelArtifactError, match="lists 2 categories, the model has 3"):
        read_model_files({**paths, "categories": other["categories"]})
    with pytest.raises(ModelArtifactError, match="missing"):
        read_model_files({key: value for key, value in paths.items() if key != "weights"})


def test_pyfunc_input_rows_are_validated(tmp_path: Path) -> None:
    image = example_image()
    (tmp_path / "a.png").write_bytes(image)
    frame = pd.DataFrame({"image": [image, None], "path": [None, str(tmp_path / "a.png")]})
    encoded, names = read_inputs(frame, root=tmp_path.resolve())
    assert encoded == [image, image] and names == ["", "a.png"]
    for frame, message in [
        (pd.DataFrame({"image": [image], "path": [str(tmp_path / "a.png")]}), "exactly one"),
        (pd.DataFrame({"path": [str(tmp_path / "missing.png")]}), "is not a file"),
        (pd.DataFrame({"url": ["http://example.com/a.png"]}), "input columns must be"),
        (pd.DataFrame({"image": [image] * (MAX_ROWS + 1)}), f"at most {MAX_ROWS} images a call"),
        (pd.DataFrame({"image": [b"0" * (MAX_IMAGE_BYTES + 1)]}), "more than .* for one image"),
    ]:
        with pytest.raises(MlflowException, match=message) as error:
            read_inputs(frame, root=tmp_path.resolve())
        assert error.value.get_http_status_code() == 400


def test_path_rows_read_only_inside_the_input_root(tmp_path: Path) -> None:
    """A served model reads no file a client names: ``path`` rows are off unless SD_DETR_INPUT_ROOT names a
    folder, and then only regular files inside it (symbolic links resolved)."""
    root = tmp_path / "inputs"
    root.mkdir()
    (root / "a.png").write_bytes(example_image())
    (tmp_path / "secret.txt").write_text("not for clients")
    (root / "link.png").symlink_to(tmp_path / "secret.txt")
    inside = pd.DataFrame({"path": [str(root / "a.png")]})
    with pytest.raises(MlflowException, match=f"'path' inputs are off: set {INPUT_ROOT_ENV}"):
        read_inputs(inside)
    assert read_inputs(inside, root=root.resolve())[1] == ["a.png"]
    for path in (tmp_path / "secret.txt", root / ".." / "secret.txt", root / "link.png", Path("/etc/hostname")):
        with pytest.raises(MlflowException, match="is outside"):
            read_inputs(pd.DataFrame({"path": [str(path)]}), root=root.resolve())
    with pytest.raises(MlflowException, match="is not a file"):
        read_inputs(pd.DataFrame({"path": [str(root)]}), root=root.resolve())


def test_concurrent_calls_keep_their_own_top_k(tmp_path: Path) -> None:
    """`mlflow models serve` runs requests in parallel threads on one model: ``top_k`` is a per-call argument,
    never state shared between calls."""
    paths, _ = tiny_model_files(tmp_path / "model")
    model = SdDetrPyfuncModel()
    model.load_context(SimpleNamespace(artifacts=paths))
    frame = pd.DataFrame({"image": [example_image(96, 64), example_image(50, 80)] * (PREDICT_CHUNK + 1)})
    start = threading.Barrier(2)

    def call(top_k: int) -> pd.DataFrame:
        start.wait()
        return model.predict(None, frame, {"top_k": top_k})

    with ThreadPoolExecutor(2) as pool:
        few, many = pool.map(call, [2, 50])
    assert few.groupby("image_index").size().max() == 2 and few["image_index"].nunique() == len(frame)
    assert many.groupby("image_index").size().min() > 2


# --- registered through a real server, loaded without pickle ------------------------------------------------


@pytest.fixture(scope="module")
def champion(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny detector registered once as version 1 of a fresh model name (alias champion)."""
    name = unique("registry-test")
    version, aliased, loaded = register_tiny_model(
        mlflow_server, name, 0.25, tmp_path_factory.mktemp("champion"), seed=1
    )
    assert (version, aliased) == ("1", True)
    return {"name": name, "uri": f"models:/{name}@champion", "loaded": loaded}


@pytest.mark.server
def test_champion_loads_as_pyfunc_with_pickle_disabled(champion: dict, registry_uri: str, no_pickle: None) -> None:
    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
    model = mlflow.pyfunc.load_model(champion["uri"])
    images = _images()
    frame = model.predict(pd.DataFrame({"image": images}), params={"score_threshold": 0.0, "top_k": 5})
    assert list(frame.columns) == ["image_index", "file_name", "category_id", "category_name", "score", "bbox"]
    assert set(frame["category_name"]) <= {"circle", "square", "triangle"}
    assert frame.groupby("image_index").size().tolist() == [5, 5]
    expected = _expected_rows(champion["loaded"], images, top_k=5)
    _assert_same_detections(frame, expected)

    info = mlflow.models.get_model_info(champion["uri"])
    assert info.signature.inputs.input_names() == ["image", "path"]
    assert [p.name for p in info.signature.params] == ["score_threshold", "top_k"]
    assert info.saved_input_example_info["type"] == "dataframe"
    # Nothing pickled in the stored model: no .pkl file, no pickled python_model.
    local = Path(mlflow.artifacts.download_artifacts(champion["uri"]))
    stored = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert not [p for p in stored if p.endswith((".pkl", ".pickle", ".pt", ".pth"))], stored
    assert {"MLmodel", "serving_model.py", "artifacts/model.safetensors", "input_example.json"} <= stored


@pytest.mark.server
def test_pipeline_loader_reads_the_same_artifact_without_running_its_code(
    champion: dict, registry_uri: str, no_pickle: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # predict.py / evaluate.py build the detector from the files; the model's code file is never imported.
    monkeypatch.setattr(mlflow.pyfunc, "load_model", lambda *a, **k: pytest.fail("pyfunc code must not run"))
    loaded = load_registered_model(champion["uri"], registry_uri)
    assert loaded.category_names == ["circle", "square", "triangle"]
    for ours, theirs in zip(
        loaded.model.state_dict().values(), champion["loaded"].model.state_dict().values(), strict=True
    ):
        assert torch.equal(ours, theirs)


@pytest.mark.server
def test_a_pickled_model_is_refused_with_a_clear_message(registry_uri: str, tmp_path: Path) -> None:
    name = unique("legacy")
    client = MlflowClient(registry_uri)
    experiment_id = client.create_experiment(unique("legacy-exp"))
    with mlflow.start_run(experiment_id=experiment_id):
        mlflow.pyfunc.log_model(  # a cloudpickled python_model, as untrusted registries may hold
            name="model", python_model=_EchoModel(), registered_model_name=name, pip_requirements=["mlflow"]
        )
    with pytest.raises(ModelArtifactError, match="not logged by this pipeline's pyfunc model"):
        load_registered_model(f"models:/{name}/1", registry_uri)


class _EchoModel(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


@pytest.mark.server
def test_predict_and_evaluate_scripts_use_the_registered_model(
    mlflow_server: str, synthetic_root: Path, tmp_path: Path, no_pickle: None
) -> None:
    from pipelines.evaluate import evaluate_model, evaluate_shards
    from pipelines.predict import PredictConfig, run

    meta = load_meta(synthetic_root / "val")
    name = unique("scripts")
    _, _, local = register_tiny_model(
        mlflow_server, name, 0.1, tmp_path / "m", categories=[(c.id, c.name) for c in meta.categories]
    )
    uri = f"models:/{name}@champion"
    images = list_images([synthetic_root / "images" / "val"])[:2]
    results = run(PredictConfig(model=uri, images=images, out=tmp_path / "d.json", tracking_uri=mlflow_server))
    assert json.loads((tmp_path / "d.json").read_text()) == results and results
    assert {r["file_name"] for r in results} == {p.name for p in images}
    # the registered model's detections are those of the model it was registered from (not just some output)
    expected = Predictor(local)([path.read_bytes() for path in images])
    assert sorted(r["score"] for r in results) == pytest.approx(
        sorted(float(s) for d in expected for s in d["scores"]), abs=1e-6
    )
    stats = evaluate_model(load_model(uri, mlflow_server), synthetic_root / "val", batch_size=4)
    assert len(stats) == 12 and all(0.0 <= v <= 1.0 or v == -1.0 for v in stats.values())
    # an untrained model scores AP 0: compare every statistic and the model-dependent score-IoU diagnostics
    registered = evaluate_shards(load_model(uri, mlflow_server), synthetic_root / "val", batch_size=4).metrics
    reference = evaluate_shards(local, synthetic_root / "val", batch_size=4).metrics
    timings = {VAL_SECONDS, VAL_PREDICT_SECONDS}
    assert registered.keys() == reference.keys()
    assert {k: v for k, v in registered.items() if k not in timings} == pytest.approx(
        {k: v for k, v in reference.items() if k not in timings}, abs=1e-6, nan_ok=True
    )
    assert math.isfinite(registered[val_metric("score_iou_spearman")])
    assert stats == pytest.approx(evaluate_shards(local, synthetic_root / "val", batch_size=4).coco_stats(), abs=1e-6)


@pytest.mark.ray
@pytest.mark.server
def test_predict_ray_data_path_loads_the_registered_model(
    ray_local, mlflow_server: str, champion: dict, tmp_path: Path
) -> None:
    from pipelines.predict import PredictConfig, predict_local, predict_with_ray

    folder = tmp_path / "images"
    folder.mkdir()
    for index, data in enumerate(_images()):
        (folder / f"{index}.png").write_bytes(data)
    files = list_images([folder])
    cfg = PredictConfig(model=champion["uri"], images=[folder], out=tmp_path / "d.json", ray_min_images=1,
                        tracking_uri=mlflow_server)  # fmt: skip
    with_ray = predict_with_ray(cfg, files)
    local = predict_local(Predictor(champion["loaded"]), files, batch_size=2)
    for ours, theirs in zip(with_ray, local, strict=True):
        assert torch.allclose(ours["scores"], theirs["scores"], atol=1e-6)
        assert torch.equal(ours["labels"], theirs["labels"])


# --- mlflow models serve -----------------------------------------------------------------------------------


def _post_json(url: str, payload: dict, timeout_s: float = 60.0) -> tuple[int, dict]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with opener.open(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@contextlib.contextmanager
def _serving(model_uri: str, tracking_uri: str, log_path: Path) -> Iterator[str]:
    """`mlflow models serve` on a free loopback port (own process group); yields its base URL once /ping is OK."""
    port = free_loopback_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false", PYTHONUNBUFFERED="1")
    # The scoring server is started as `uvicorn ...` through bash: the venv's scripts must be on PATH.
    env["PATH"] = os.pathsep.join([str(mlflow_executable().parent), env.get("PATH", "")])
    command = [str(mlflow_executable()), "models", "serve", "-m", model_uri, "--env-manager", "local",
               "-h", LOOPBACK, "-p", str(port), "--workers", "1"]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base_url = f"http://{LOOPBACK}:{port}"
    try:
        deadline = time.monotonic() + SERVE_STARTUP_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlflow models serve exited {process.returncode}: {log_path.read_text()[-4000:]}")
            with contextlib.suppress(OSError):
                if http_get(f"{base_url}/ping", timeout_s=2.0)[0] == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow models serve not up after {SERVE_STARTUP_S:.0f} s: {log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield base_url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)


@pytest.mark.server
@pytest.mark.skipif(sys.platform != "linux", reason="process groups")
def test_mlflow_models_serve_answers_an_http_post_with_an_image(
    champion: dict, mlflow_server: str, tmp_path: Path
) -> None:
    image = example_image(96, 64)
    with _serving(champion["uri"], mlflow_server, tmp_path / "serve.log") as url:
        payload = {
            "dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image).decode()]]},
            "params": {"score_threshold": 0.0, "top_k": 4},
        }
        status, body = _post_json(f"{url}/invocations", payload)
        assert status == 200, body
        predictions = pd.DataFrame(body["predictions"])
        expected = _expected_rows(champion["loaded"], [image], top_k=4)
        _assert_same_detections(predictions, expected)
        # Bytes that are no image: a 400 naming the row, the server stays up.
        garbage = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b"not an image").decode()]]}}
        status, body = _post_json(f"{url}/invocations", garbage)
        assert status == 400 and "not decodable images" in body.get("message", ""), body
        assert http_get(f"{url}/ping")[0] == 200


# --- the champion alias ------------------------------------------------------------------------------------


@pytest.mark.server
def test_alias_moves_only_to_a_better_version_and_is_re_read(mlflow_server: str, tmp_path: Path) -> None:
    name = unique("alias")
    client = MlflowClient(mlflow_server)
    assert register_tiny_model(mlflow_server, name, 0.30, tmp_path / "1")[:2] == ("1", True)
    assert register_tiny_model(mlflow_server, name, 0.20, tmp_path / "2")[:2] == ("2", False)
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert register_tiny_model(mlflow_server, name, 0.40, tmp_path / "3")[:2] == ("3", True)
    assert client.get_model_version_by_alias(name, "champion").version == "3"
    assert client.get_model_version(name, "3").tags[AP_TAG] == "0.400000"


@pytest.mark.server
def test_unreadable_champion_tag_keeps_the_alias(mlflow_server: str, tmp_path: Path) -> None:
    name = unique("alias-tag")
    client = MlflowClient(mlflow_server)
    register_tiny_model(mlflow_server, name, 0.30, tmp_path / "1")
    client.set_model_version_tag(name, "1", AP_TAG, "n/a")  # e.g. edited by hand in the UI
    with pytest.raises(AliasNotMovedError, match=r"version 1, whose val_AP tag is 'n/a'") as failed:
        register_tiny_model(mlflow_server, name, 0.90, tmp_path / "2")
    assert failed.value.version == "2" and isinstance(failed.value.cause, AliasUpdateError)
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert client.get_model_version(name, "2").tags[AP_TAG] == "0.900000"  # registered, only the alias stayed


@pytest.mark.server
def test_a_server_error_reading_the_champion_propagates(
    mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = unique("alias-5xx")
    client = MlflowClient(mlflow_server)
    register_tiny_model(mlflow_server, name, 0.30, tmp_path / "1")
    register_tiny_model(mlflow_server, name, 0.10, tmp_path / "2")

    def unavailable(self, model_name):
        raise MlflowException("API request failed with error code 503", error_code=TEMPORARILY_UNAVAILABLE)

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "get_registered_model", unavailable)
        with pytest.raises(MlflowException, match="503"):
            update_alias(MlflowClient(mlflow_server), name, "champion", "2", 0.99)
    assert client.get_model_version_by_alias(name, "champion").version == "1"


@pytest.mark.server
def test_a_model_without_the_alias_gets_it(mlflow_server: str, tmp_path: Path) -> None:
    name = unique("alias-none")
    client = MlflowClient(mlflow_server)
    register_tiny_model(mlflow_server, name, 0.30, tmp_path / "1", alias="staging")
    assert update_alias(client, name, "champion", "1", 0.0) is True
    assert client.get_registered_model(name).aliases == {"staging": "1", "champion": "1"}


@pytest.mark.server
def test_an_alias_moved_concurrently_is_reported(
    mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = unique("alias-race")
    register_tiny_model(mlflow_server, name, 0.30, tmp_path / "1")
    register_tiny_model(mlflow_server, name, 0.10, tmp_path / "2")
    original = MlflowClient.set_registered_model_alias

    def set_then_other_job_moves_it(self, model_name, alias, version):
        original(self, model_name, alias, version)
        original(self, model_name, alias, "1")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", set_then_other_job_moves_it)
    with pytest.raises(AliasUpdateError, match="now points at version 1"):
        update_alias(MlflowClient(mlflow_server), name, "champion", "2", 0.99)


def test_no_test_or_pipeline_switches_pickle_loading_on() -> None:
    switch = "MLFLOW_ALLOW_PICKLE_" + "DESERIALIZATION"
    pickled = 'serialization_format="' + 'pickle"'
    offenders = []
    for folder in ("pipelines", "tests", "tune", "sd_detr"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            for line in text.splitlines():
                if (switch in line and "true" in line.lower()) or pickled in line:
                    offenders.append(f"{path.relative_to(REPO)}: {line.strip()}")
    assert offenders == []
