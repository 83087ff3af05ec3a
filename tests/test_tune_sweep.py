"""tune/sweep.py: config validation and search space (fast), the report parts (fast), and a 2x2 sweep on a local
Ray that is interrupted with Ctrl+C and resumed, checked through the CLI output, Tune's results and MLflow."""

from __future__ import annotations

import csv
import io
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from pydantic import ValidationError

from pipelines.config import TrainJobConfig
from pipelines.ray_cluster import ClusterTooSmallError
from sd_detr.config import load_config
from tests.pipeline_helpers import REPO, tiny_job_overrides
from tune import report
from tune.cluster import check_sweep_fits
from tune.config import ALIGN_PATH, SPLIT_PATH, SearchKey, SweepConfig, build_trial_config
from tune.sweep import main
from tune.trial import trial_run_name
from tune.tuner import param_space

CONFIGS = [REPO / "configs" / "default.yaml", REPO / "tune" / "sweep.yaml"]
CONFIG_ARGS = [arg for path in CONFIGS for arg in ("--config", str(path))]


def _sweep_config(overrides: list[str]) -> SweepConfig:
    return load_config(SweepConfig, CONFIGS, overrides)


# ---------------------------------------------------------------- fast: config, search space, report


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sweep.query_split.values=[0, 5]", "sweep.query_split: values [5] out of range"),
        ("sweep.align_loss_weight={kind: uniform, low: 0.1, high: 2.0}", "cannot be enumerated by sweep.search=grid"),
        ("sweep.extra={model.taq: [true, maybe]}", "sweep.extra['model.taq']"),
        ("sweep.asha.max_t=400", "sweep.asha.max_t (400) exceeds optimizer.epochs ("),  # whatever the default epochs
    ],
)
def test_invalid_sweep_config_exits_before_ray_starts(override: str, message: str, tmp_path, capsys) -> None:
    storage = tmp_path / "ray_results"
    with pytest.raises(SystemExit) as stop:
        main([*CONFIG_ARGS, "--set", override, "--set", f"training.storage_path={storage}"])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert not storage.exists()


def test_every_combination_of_searched_values_is_checked() -> None:
    """A value valid on its own can break a trial with another key's value: checked before Ray, per combination."""
    layers = "sweep.extra={model.transformer.num_decoder_layers: [2, 3]}"
    with pytest.raises(ValidationError, match=r"sweep \(the combination\).*'model.query_split': 3.*layers': 2"):
        _sweep_config(["sweep.query_split.values=[0, 3]", layers])
    with pytest.raises(ValidationError, match=r"model\.query_split set with model\.variant=conditional_detr"):
        _sweep_config(["sweep.extra={model.variant: [conditional_detr]}"])
    deeper = _sweep_config(
        ["sweep.query_split.values=[0, 5]", "sweep.extra={model.transformer.num_decoder_layers: [6]}"]
    )
    assert deeper.sweep.query_split.candidates() == [0, 5]  # every trial has 6 layers: split 5 is valid


def test_sweep_of_a_baseline_config_exits_before_ray_starts(tmp_path, capsys) -> None:
    """The search space is SD-DETR's: a conditional_detr trial config is refused up front, naming the variant."""
    storage = tmp_path / "ray_results"
    baseline = ["--config", str(REPO / "configs" / "variants" / "conditional_detr.yaml")]
    with pytest.raises(SystemExit) as stop:
        main([*CONFIG_ARGS, *baseline, "--set", f"training.storage_path={storage}"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "model.variant=conditional_detr" in err and "loss.align_loss_weight" in err and "model.query_split" in err
    assert not storage.exists()


def test_sweep_of_the_paper_config_without_weights_exits_before_ray_starts(tmp_path, capsys, monkeypatch) -> None:
    import tune.sweep

    def forbidden(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the sweep went past its checks to Ray")

    monkeypatch.setattr(tune.sweep, "ensure_ray", forbidden)  # whether this session already runs Ray does not matter
    storage = tmp_path / "ray_results"
    paper = ["--config", str(REPO / "configs" / "coco_r50.yaml"), "--config", str(REPO / "tune" / "sweep.yaml")]
    with pytest.raises(SystemExit) as stop:
        main([*paper, "--set", f"training.storage_path={storage}", "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}"])  # fmt: skip
    assert stop.value.code == 2
    assert "model.backbone.weights_path" in capsys.readouterr().err
    assert not storage.exists() and not (tmp_path / "m.db").exists()


def test_a_second_driver_of_the_same_sweep_exits_2_naming_the_first(tmp_path, capsys, monkeypatch) -> None:
    """One sweep driver per name and storage: a second submission would drive the same Tune experiment, parent run
    and trial runs. It stops before tracking, data and Ray, naming the holder."""
    import tune.sweep
    from pipelines.run_guard import sweep_lock

    def forbidden(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the second driver went past the lock")

    monkeypatch.setattr(tune.sweep, "check_reachable", forbidden)
    storage = tmp_path / "ray_results"
    with sweep_lock(str(storage), "locked-sweep"), pytest.raises(SystemExit) as stop:
        main([*CONFIG_ARGS, "--set", "sweep.name=locked-sweep", "--set", f"training.storage_path={storage}"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "sweep 'locked-sweep'" in err and f"pid {os.getpid()}" in err


def test_search_space_grid_and_random() -> None:
    grid = _sweep_config(["sweep.align_loss_weight.values=[0.5, 2.0]", "sweep.query_split={kind: range, low: 0, high: 2}",
                          "sweep.extra={optimizer.lr: [1.0e-4, 4.0e-4]}"])  # fmt: skip
    assert grid.num_trials() == 2 * 3 * 2
    assert param_space(grid) == {
        ALIGN_PATH: {"grid_search": [0.5, 2.0]},
        SPLIT_PATH: {"grid_search": [0, 1, 2]},
        "optimizer.lr": {"grid_search": [1e-4, 4e-4]},
    }
    random = _sweep_config(["sweep.search=random", "sweep.num_samples=5", "sweep.query_split={kind: range, low: 1, high: 3}",
                            "sweep.align_loss_weight={kind: loguniform, low: 0.1, high: 4.0}"])  # fmt: skip
    assert random.num_trials() == 5
    space = param_space(random)
    weights = [space[ALIGN_PATH].sample() for _ in range(300)]
    splits = {space[SPLIT_PATH].sample() for _ in range(300)}
    assert all(0.1 <= w < 4.0 for w in weights) and min(weights) < 0.5 < 2.0 < max(weights)
    assert splits == {1, 2, 3}  # the range is inclusive


def _asha_decisions(scheduler, trial_aps: dict[str, list[float]]) -> dict[str, tuple[str, int]]:
    """Feed each trial's val APs, one result per epoch and one trial after the other, to ``scheduler``: trial id ->
    (its last decision, the epochs it ran)."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    scheduler.set_search_properties("val_AP", "max")
    decisions = {}
    for trial_id, aps in trial_aps.items():
        trial = SimpleNamespace(trial_id=trial_id)
        scheduler.on_trial_add(None, trial)
        for epoch, ap in enumerate(aps, start=1):
            action = scheduler.on_trial_result(None, trial, {"epochs_done": epoch, "val_AP": ap})
            decisions[trial_id] = (action, epoch)
            if action != TrialScheduler.CONTINUE:
                break
    return decisions


def test_asha_never_stops_a_trial_on_its_last_epoch() -> None:
    """8 epochs, grace 2, factor 2: ASHA's top rung is epoch 8 itself. A trial below that rung's cutoff has trained
    every epoch by then and ends by itself; it is not stopped (a stop would kill it while its last checkpoint is
    registered). Earlier rungs still stop, and a budget below the epochs (max_t) is still enforced."""
    from tune.tuner import build_scheduler

    cfg = _sweep_config(["optimizer.epochs=8", "optimizer.lr_drop_epochs=[6]"])
    assert [milestone for milestone, _ in build_scheduler(cfg)._brackets[0]._rungs] == [8, 4, 2]
    aps = {"good": [0.3] * 8, "late_drop": [0.4] * 7 + [0.1], "weak": [0.1] * 8}
    decisions = _asha_decisions(build_scheduler(cfg), aps)
    assert decisions["good"] == ("CONTINUE", 8) and decisions["late_drop"] == ("CONTINUE", 8)
    assert decisions["weak"] == ("STOP", 2)  # below the cutoff at the first rung: stopped early, as ASHA should
    budget = _sweep_config(["optimizer.epochs=8", "optimizer.lr_drop_epochs=[6]", "sweep.asha.max_t=4"])
    assert _asha_decisions(build_scheduler(budget), {"any": [0.5] * 8})["any"] == ("STOP", 4)
    assert build_scheduler(_sweep_config(["sweep.asha.enabled=false"])) is None


def test_trial_config_sets_the_knobs_and_keeps_the_dataset_class_count_open() -> None:
    cfg = _sweep_config(["sweep.extra={model.taq: [false]}"])
    trial = build_trial_config(cfg.job_config_dict(), {ALIGN_PATH: 0.25, SPLIT_PATH: 2, "model.taq": False}, "s-1")
    assert trial.loss.align_loss_weight == 0.25 and trial.model.query_split == 2 and trial.model.taq is False
    assert trial.training.run_name == "s-1" and trial.optimizer.epochs == cfg.optimizer.epochs
    assert "num_classes" not in trial.model.model_fields_set  # the dataset decides it (pipelines.training.resolve_data)


def test_a_trial_registers_nothing_the_sweep_registers_its_best() -> None:
    """Each trial closes its own run (tune/trial.py); registering there would add a version per finished trial
    and move the alias to trials that are not the best. The best trial's config still says what the sweep
    does at its end (tracking.register_model as given)."""
    from tune.trial import trial_job_config

    cfg = _sweep_config([])
    params = {ALIGN_PATH: 0.25, SPLIT_PATH: 2}
    assert cfg.tracking.register_model
    trial = trial_job_config(cfg.job_config_dict(), params, "s-1")
    assert not trial.tracking.register_model and trial.loss.align_loss_weight == 0.25
    assert build_trial_config(cfg.job_config_dict(), params, "s-1").tracking.register_model


def test_rows_table_heatmap_and_best_config(tmp_path) -> None:
    keys = _sweep_config([]).search_keys()

    def row(trial: str, weight: float, split: int, metrics: dict, error: Exception | None = None):
        params = {ALIGN_PATH: weight, SPLIT_PATH: split}
        return report.trial_row("s", keys, 2, trial, params, {"trial_id": trial, **metrics}, error)

    rows = report.sort_rows([
        row("a_00000", 0.5, 0, {"epochs_done": 1, "val_AP": 0.10, "best_val_AP": 0.10, "best_epoch": 0}),
        row("a_00001", 2.0, 0, {"epochs_done": 2, "val_AP": 0.25, "best_val_AP": 0.30, "best_epoch": 0}),
        row("a_00002", 0.5, 2, {}, RuntimeError("worker died")),
        row("a_00003", 2.0, 2, {"epochs_done": 2, "val_AP": 0.20, "best_val_AP": 0.20, "best_epoch": 1}),
        row("a_00004", 1.0, 1, {"epochs_done": 1, "val_AP": 0.50, "best_val_AP": 0.50}, RuntimeError("oom")),
    ])  # fmt: skip
    assert [(r.trial_id, r.status) for r in rows] == [  # a failed trial never ranks above a completed one
        ("a_00001", "finished"), ("a_00003", "finished"), ("a_00000", "stopped"), ("a_00004", "error"),
        ("a_00002", "error"),
    ]  # fmt: skip
    assert rows[0].run_name == "s-a_00001-w2-s0" and report.best_row(rows) is rows[0]
    tied = [row("a_00007", 0.5, 0, {"best_val_AP": 0.3}), row("a_00004", 2.0, 2, {"best_val_AP": 0.3})]
    assert report.best_row(tied).trial_id == "a_00004"  # ties go to the first trial: a rerun picks the same best
    lines = report.format_table(rows, keys).splitlines()
    assert lines[0].split() == ["rank", "best", "val", "AP", "last", "val", "AP", "align_loss_weight", "query_split",
                                "epochs", "status", "run"]  # fmt: skip
    assert len(lines) == 2 + 5 and lines[2].split()[3:7] == ["2", "0", "2", "finished"]
    assert [line.split()[1] for line in lines[2:]] == ["0.3000", "0.2000", "0.1000", "0.5000", "nan"]
    records = list(csv.DictReader(io.StringIO(report.csv_table(rows, keys))))
    assert list(records[0])[:4] == ["trial_id", "run_name", ALIGN_PATH, SPLIT_PATH]
    assert records[4]["status"] == "error" and "worker died" in records[4]["error"]
    assert float(records[0]["best_val_AP"]) == 0.30
    png = report.heatmap_png(rows, keys, tmp_path / "heat.png", "s")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = {"trials": 5.0, "sweep_seconds": 12.0, "trials_finished": 2.0, "trials_stopped": 1.0,
               "trials_error": 2.0, "best_val_AP": 0.30}  # fmt: skip
    assert report.summary_metrics(rows, 12.0) == summary
    assert rows[2].ended().final_metrics == {"final_val_AP": 0.10, "epochs_done": 1.0}

    cfg = _sweep_config(["sweep.name=s"])
    (tmp_path / "best.yaml").write_text(report.best_config_yaml(cfg, rows[0].params, num_classes=5))
    best = load_config(TrainJobConfig, tmp_path / "best.yaml")  # what pipelines/train.py --config does
    assert best.loss.align_loss_weight == 2.0 and best.model.query_split == 0 and best.model.num_classes == 5
    assert best.training.run_name == "s-best" and best.tracking.register_model is True


@pytest.mark.parametrize("extra", [{}, {"optimizer.lr": [1.0e-4, 4.0e-4], "model.taq": [True, False]}])
def test_search_keys_follow_the_sweep_config(extra: dict) -> None:
    cfg = _sweep_config([f"sweep.extra={extra}"])
    keys = cfg.search_keys()
    assert [k.path for k in keys] == [ALIGN_PATH, SPLIT_PATH, *sorted(extra)]
    assert set(param_space(cfg)) == {k.path for k in keys}  # what Tune searches


def _generic_rows(keys: list[SearchKey], values: list[tuple], aps: list[float]) -> list:
    rows = []
    for index, (params, ap) in enumerate(zip(values, aps, strict=True)):
        trial = f"b_{index:05d}"
        metrics = {"epochs_done": 3, "val_AP": ap, "best_val_AP": ap, "best_epoch": 2}
        config = dict(zip([k.path for k in keys], params, strict=True))
        rows.append(report.trial_row("g", keys, 3, trial, config, metrics, None))
    return report.sort_rows(rows)


def test_one_searched_key_names_tables_and_skips_the_heat_map(tmp_path, caplog) -> None:
    keys = [SearchKey("optimizer.lr", "optimizer.lr", "lr")]
    rows = _generic_rows(keys, [(1e-4,), (4e-4,)], [0.2, 0.3])
    assert [r.run_name for r in rows] == ["g-b_00001-lr0.0004", "g-b_00000-lr0.0001"]
    header = report.format_table(rows, keys).splitlines()[0].split()
    assert header[7:] == ["optimizer.lr", "epochs", "status", "run"]
    markdown = report.markdown_table(rows, keys).splitlines()
    assert markdown[0].startswith("| rank | best val AP | last val AP | optimizer.lr |")
    records = list(csv.DictReader(io.StringIO(report.csv_table(rows, keys))))
    assert [r["optimizer.lr"] for r in records] == ["0.0004", "0.0001"]
    with caplog.at_level("INFO", logger="tune.report"):
        assert report.heatmap_png(rows, keys, tmp_path / "heat.png", "g") is None
    assert "needs two searched keys" in caplog.text and not (tmp_path / "heat.png").exists()


def test_three_searched_keys_name_runs_and_draw_the_first_two(tmp_path) -> None:
    keys = [SearchKey("optimizer.lr", "optimizer.lr", "lr"), SearchKey("model.taq", "taq", "taq", "query generation"),
            SearchKey("data.name", "data", "d")]  # fmt: skip
    values = [(1e-4, True, "a b"), (1e-4, False, "c"), (4e-4, True, "c"), (1e-4, True, "c")]
    rows = _generic_rows(keys, values, [0.1, 0.2, 0.3, 0.4])
    assert rows[0].run_name == "g-b_00003-lr0.0001-taqTrue-dc"
    assert {r.run_name for r in rows} >= {"g-b_00000-lr0.0001-taqTrue-da_b"}  # a run name holds no space
    table = report.format_table(rows, keys).splitlines()
    assert table[0].split()[7:10] == ["optimizer.lr", "taq", "data"]
    assert table[2].split()[3:6] == ["0.0001", "True", "c"]
    records = list(csv.DictReader(io.StringIO(report.csv_table(rows, keys))))
    assert (records[0]["optimizer.lr"], records[0]["model.taq"], records[0]["data.name"]) == ("0.0001", "True", "c")
    png = report.heatmap_png(rows, keys, tmp_path / "heat.png", "g")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trial_run_name_of_the_two_knobs() -> None:
    keys = _sweep_config(["sweep.extra={model.taq: [true, false]}"]).search_keys()
    params = {ALIGN_PATH: 0.5, SPLIT_PATH: 1, "model.taq": False}
    assert trial_run_name("sweep", "3f2a1_00002", params, keys[:2]) == "sweep-3f2a1_00002-w0.5-s1"
    assert trial_run_name("sweep", "3f2a1_00002", params, keys) == "sweep-3f2a1_00002-w0.5-s1-taqFalse"


# ---------------------------------------------------------------- Ray: resources, 2x2 sweep interrupted and resumed


@pytest.mark.ray
def test_concurrent_trials_must_leave_a_cpu_for_ray_data(ray_local) -> None:
    check_sweep_fits(cpus_per_trial=2.01, max_concurrent_trials=1, data_cpus=1.0)  # 3.01 of the 4 CPUs
    with pytest.raises(ClusterTooSmallError, match=r"sweep needs 5\.02"):
        check_sweep_fits(cpus_per_trial=2.01, max_concurrent_trials=2, data_cpus=1.0)


SWEEP = "sweep-test"
TRIAL_LINE = re.compile(r"\[trial (\w+_\d{5})\]")


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float, int]]:
    return sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key))


def _runs(client: MlflowClient) -> tuple[object, list]:
    experiment = client.get_experiment_by_name("sd-detr")
    parent = client.search_runs([experiment.experiment_id], f"tags.`sd_detr.run_name` = '{SWEEP}'")[0]
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return parent, sorted(children, key=lambda run: run.data.tags["sd_detr.tune.trial_id"])


def _wait_for_trials(process: subprocess.Popen, log: Path, count: int, timeout_s: float) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        started = list(dict.fromkeys(TRIAL_LINE.findall(log.read_text())))
        if len(started) >= count:
            return started
        assert process.poll() is None, f"sweep exited early ({process.returncode}):\n{log.read_text()[-4000:]}"
        time.sleep(1.0)
    raise AssertionError(f"{count} trials did not start in {timeout_s:.0f}s:\n{log.read_text()[-4000:]}")


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_interrupted_and_resumed_registers_the_best_trial(ray_local, synthetic_root, tmp_path) -> None:
    # 2x2 grid, 1 worker, 2 epochs. ASHA's budget max_t=1 stops every trial after its first epoch while its
    # Train run is still going (AP is 0 everywhere after an epoch of a tiny model, so rung cutoffs never
    # fire here): each stop kills a trial actor mid-run. The worker reserves 2 of the 4 logical CPUs, so
    # the next trial only starts once the stopped trial's placement group has been freed.
    overrides = [
        *tiny_job_overrides(tmp_path, synthetic_root, "tune-base", epochs=2),
        "scaling.num_workers=1", "scaling.cpus_per_worker=2", "training.num_prediction_images=0",
        f"sweep.name={SWEEP}", "sweep.align_loss_weight.values=[0.5, 2.0]", "sweep.query_split.values=[0, 2]",
        "sweep.asha.grace_period=1", "sweep.asha.max_t=1", "sweep.max_concurrent_trials=1",
        f"sweep.best_config_out={tmp_path / 'best.yaml'}",
    ]  # fmt: skip
    command = [sys.executable, str(REPO / "tune" / "sweep.py"), *CONFIG_ARGS]
    command += [arg for override in overrides for arg in ("--set", override)]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    groups_before = set(ray_local.util.placement_group_table())
    started = time.perf_counter()

    # 1. Start the sweep and press Ctrl+C once the second trial has created its MLflow run.
    log = tmp_path / "first.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        try:
            first_trials = _wait_for_trials(process, log, count=2, timeout_s=420)
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=180) == 130, log.read_text()[-4000:]
        finally:
            if process.poll() is None:
                process.kill()
    assert "interrupted after 1 of 4 trials; rerun the same command" in log.read_text()
    parent, children = _runs(client)
    assert parent.info.status == "KILLED" and len(children) == 2
    done, cut = children
    assert done.data.tags["sd_detr.tune.trial_id"] == first_trials[0]
    assert done.info.status == "KILLED" and done.data.tags["sd_detr.tune.outcome"] == "stopped_by_asha"
    assert cut.info.status == "KILLED" and cut.data.tags["sd_detr.tune.outcome"] == "interrupted"
    done_history = _history(client, done.info.run_id, "val_AP")
    assert [step for step, _, _ in done_history] == [0]

    # 2. The same command again resumes: Tuner.restore keeps the finished trial, continues the cut one.
    second = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    output = second.stdout + second.stderr
    (tmp_path / "second.log").write_text(output)
    assert second.returncode == 0, output[-4000:]
    seconds = time.perf_counter() - started
    assert f"Resuming sweep '{SWEEP}'" in output

    parent, children = _runs(client)
    trial_ids = [run.data.tags["sd_detr.tune.trial_id"] for run in children]
    assert len(children) == 4 and len({tid.split("_")[0] for tid in trial_ids}) == 1  # one restored experiment
    by_trial = dict(zip(trial_ids, children, strict=True))
    assert _history(client, done.info.run_id, "val_AP") == done_history  # not trained again
    assert "sd_detr.resumed" not in by_trial[done.data.tags["sd_detr.tune.trial_id"]].data.tags
    assert by_trial[cut.data.tags["sd_detr.tune.trial_id"]].info.run_id == cut.info.run_id
    assert by_trial[cut.data.tags["sd_detr.tune.trial_id"]].data.tags["sd_detr.resumed"] == "true"

    # Every trial was stopped by ASHA after epoch 1 (none hung or failed), with its per-epoch metrics.
    for run in children:
        assert run.info.status == "KILLED" and run.data.tags["sd_detr.tune.outcome"] == "stopped_by_asha"
        assert [step for step, _, _ in _history(client, run.info.run_id, "val_AP")][:1] == [0]
        assert run.data.metrics["epochs_done"] == 1.0 and "train_loss" in run.data.metrics
        assert {run.data.params[ALIGN_PATH], run.data.params[SPLIT_PATH]} <= {"0.5", "2.0", "0", "2"}
    assert {(r.data.params[ALIGN_PATH], r.data.params[SPLIT_PATH]) for r in children} == {
        ("0.5", "0"), ("0.5", "2"), ("2.0", "0"), ("2.0", "2")
    }  # fmt: skip

    # Parent: finished, resumed, summary table + heat map + best config; best model registered and aliased.
    assert parent.info.status == "FINISHED" and parent.data.tags["sd_detr.resumed"] == "true"
    assert parent.data.metrics["trials"] == 4 and parent.data.metrics["trials_stopped"] == 4
    artifacts = {item.path for item in client.list_artifacts(parent.info.run_id, "sweep")}
    assert artifacts == {"sweep/trials.csv", "sweep/trials.md", "sweep/ap_heatmap.png", "sweep/best_config.yaml"}
    table = Path(client.download_artifacts(parent.info.run_id, "sweep/trials.csv", str(tmp_path)))
    records = list(csv.DictReader(table.open()))
    assert sorted(r["trial_id"] for r in records) == sorted(trial_ids)
    assert all(r["status"] == "stopped" and r["epochs_done"] == "1" for r in records)
    best_run_id = parent.data.tags["sd_detr.tune.best_run_id"]
    best_ap = max(float(r["best_val_AP"]) for r in records)
    assert math.isclose(parent.data.metrics["best_val_AP"], best_ap)
    model_name = "tiny-tune-base"
    version = client.get_model_version_by_alias(model_name, "champion")
    assert version.run_id == best_run_id and str(version.version) == parent.data.tags["sd_detr.registered_version"]

    # Terminal: the table sorted by AP; the best config loads as a pipelines/train.py config.
    lines = second.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("rank  best val AP"))
    shown = [float(line.split()[1]) for line in lines[header + 2 : header + 6]]
    assert shown == sorted(shown, reverse=True) and len(shown) == 4
    best = load_config(TrainJobConfig, tmp_path / "best.yaml")
    best_run = client.get_run(best_run_id)
    assert str(best.loss.align_loss_weight) == best_run.data.params[ALIGN_PATH]
    assert str(best.model.query_split) == best_run.data.params[SPLIT_PATH]
    assert yaml.safe_load((tmp_path / "best.yaml").read_text())["training"]["run_name"] == f"{SWEEP}-best"

    # No stopped trial kept its workers' resources (Train's placement-group cleaner freed them).
    deadline = time.monotonic() + 60
    while True:
        table = ray_local.util.placement_group_table()
        held = [pg for pg_id, pg in table.items() if pg_id not in groups_before and pg["state"] != "REMOVED"]
        if not held or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not held, held
    assert len(set(table) - groups_before) >= 4  # one group per trial run (more if the cut trial got one)

    # Rerunning the finished sweep trains nothing and registers no new version; another grid is refused.
    arguments = [*CONFIG_ARGS, *[a for o in overrides for a in ("--set", o)]]
    histories = {run.info.run_id: _history(client, run.info.run_id, "val_AP") for run in children}
    main(arguments)
    assert {run.info.run_id: _history(client, run.info.run_id, "val_AP") for run in _runs(client)[1]} == histories
    assert len(client.search_model_versions(f"name = '{model_name}'")) == 1
    with pytest.raises(SystemExit) as refused:
        main([*arguments, "--set", "sweep.query_split.values=[1]"])
    assert refused.value.code == 2
    print(f"\n2x2 sweep, interrupted and resumed: {seconds:.0f} s")
