"""One config loader for every entry point: ``--config``/``--set`` (plus a script's own flags as sugar for
its fields); files or values that do not parse exit 2 with one line, like every other config error."""

from pathlib import Path

import pytest

import pipelines.evaluate as evaluate_cli
import pipelines.predict as predict_cli
import pipelines.train as train_cli


@pytest.fixture
def no_training(monkeypatch):
    """train.py's main must stop at the config: running the job (Ray) would be a test failure."""

    def refuse(cfg):
        raise AssertionError("run_training reached: the config should have been rejected")

    monkeypatch.setattr(train_cli, "run_training", refuse)


def _one_line_error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: invalid config: ")
    return lines[0]


def test_malformed_yaml_file_exits_2_with_one_line(tmp_path, capsys, no_training):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  num_queries: [1, 2\n  variant: sd_detr\n")
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--config", str(path)])
    assert exit_info.value.code == 2
    line = _one_line_error(capsys)
    assert str(path) in line and "not valid YAML" in line and "line " in line


def test_malformed_json_file_exits_2_with_one_line(tmp_path, capsys, no_training):
    path = tmp_path / "broken.json"
    path.write_text('{"model": ')
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--config", str(path)])
    assert exit_info.value.code == 2
    assert "not valid JSON" in _one_line_error(capsys)


@pytest.mark.parametrize("value", ["model.num_queries=[1, 2", "training.run_name={a: b", "loss.focal_alpha='0.5"])
def test_malformed_set_value_exits_2_with_one_line(value, capsys, no_training):
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--set", value])
    assert exit_info.value.code == 2
    line = _one_line_error(capsys)
    assert f"--set {value!r}" in line and "not valid YAML" in line


@pytest.mark.parametrize("key", [".", "", "training..run_name", "training."])
def test_set_with_an_empty_key_segment_exits_2_with_one_line(key, capsys, no_training):
    override = f"{key}=1"
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--set", override])
    assert exit_info.value.code == 2
    assert repr(override) in _one_line_error(capsys)


def test_set_order_does_not_change_the_config(monkeypatch):
    """A YAML date (``2026-12-01``) is a run name's string whether its ``--set`` comes first or last."""
    seen = []
    monkeypatch.setattr(train_cli, "run_training", seen.append)
    monkeypatch.setattr(train_cli, "log_summary", lambda outcome, cfg: None)
    name, epochs = "training.run_name=2026-12-01", "optimizer.epochs=3"
    train_cli.main(["--set", name, "--set", epochs])
    train_cli.main(["--set", epochs, "--set", name])
    assert seen[0] == seen[1]
    assert (seen[1].training.run_name, seen[1].optimizer.epochs) == ("2026-12-01", 3)


def _capture(monkeypatch, module, name):
    seen = {}

    def fake(*args):
        seen["args"] = args
        return {} if name == "evaluate_model" else []

    monkeypatch.setattr(module, name, fake)
    monkeypatch.setattr(module, "load_model", lambda model, uri: (model, uri))
    return seen


def test_evaluate_flags_config_and_set_layer(tmp_path, monkeypatch):
    seen = _capture(monkeypatch, evaluate_cli, "evaluate_model")
    config = tmp_path / "eval.yaml"
    config.write_text("model: models:/m@champion\ndata: shards/val\nbatch_size: 4\ntracking_uri: http://x\n")
    evaluate_cli.main(["--config", str(config), "--batch-size", "2", "--set", "data=other/val"])
    assert seen["args"] == (("models:/m@champion", "http://x"), Path("other/val"), 2)
    evaluate_cli.main(["--model", "ckpt", "--data", "d"])  # the README form, no config file
    assert seen["args"] == (("ckpt", None), Path("d"), 8)


def test_evaluate_without_model_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_cli.main(["--data", "d"])
    assert exit_info.value.code == 2
    assert "model: Field required" in capsys.readouterr().err


def test_predict_flags_config_and_set_layer(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(predict_cli, "run", lambda cfg: seen.setdefault("cfg", cfg))
    config = tmp_path / "predict.yaml"
    config.write_text("model: ckpt\nout: d.json\nscore_threshold: 0.5\n")
    predict_cli.main(["--config", str(config), "--images", "a.jpg", "b/", "--set", "ray_min_images=9"])
    cfg = seen["cfg"]
    assert (cfg.model, cfg.images, cfg.out) == ("ckpt", [Path("a.jpg"), Path("b/")], Path("d.json"))
    assert (cfg.score_threshold, cfg.ray_min_images, cfg.batch_size) == (0.5, 9, 8)


def test_predict_bad_threshold_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict_cli.main(["--model", "m", "--images", "a.jpg", "--out", "o.json", "--score-threshold", "2"])
    assert exit_info.value.code == 2
    assert "score_threshold" in capsys.readouterr().err
