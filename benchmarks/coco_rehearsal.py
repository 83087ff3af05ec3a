"""COCO rehearsal: the README's COCO cluster recipe, end to end on one machine, on a COCO-shaped dataset.

    .venv/bin/python benchmarks/coco_rehearsal.py                        # CPU, paper sizes, both variants
    .venv/bin/python benchmarks/coco_rehearsal.py --size reduced --images 4 --val-images 2 --variants sd_detr
    .venv/bin/python benchmarks/coco_rehearsal.py --gpu --images 800 --val-images 50   # one GPU worker
    .venv/bin/python benchmarks/coco_rehearsal.py --third-party   # source json without iscrowd/area/ids

Stages (a failed stage is logged and the script exits 1):
 1. generate a COCO-shaped train and val split (`sd_detr.data.coco_like`) into `<work>/coco`, laid out as
    COCO is (`annotations/instances_{train,val}2017.json`, `train2017/`, `val2017/`); it plays `/coco`;
 2. convert both splits with the README's command, `python pipelines/prepare_data.py coco ...`, into
    `<work>/shared/data/coco/{train,val}` (`<work>/shared` plays the cluster's `/shared`);
 3. delete `<work>/coco`: from here on nothing can read the source json or images;
 4. save torchvision's ResNet-50 `state_dict` (`resnet50(weights=None)`: random, offline, but torchvision's
    key names) under the README's file name, `<work>/shared/weights/resnet50-0676ba61.pth`;
 5. per variant (`sd_detr`, `conditional_detr`): the README's train command with `<work>/shared` for
    `/shared`, plus what one machine needs (workers, CPU/GPU, one epoch, tracking under `<work>`);
 6. check in MLflow that the run has `val_AP` for epoch 0 and that a model version was registered, and print
    one row per variant: steps, steps/s, images/s per worker, peak memory, data-wait share, val AP.

Peak memory: on CUDA the per-process GPU memory `nvidia-smi` reports for the job's processes (the worker
reports no `torch.cuda.max_memory_allocated`); on CPU the largest peak RSS (`VmHWM`) of a Ray Train worker
process, and the peak of the summed PSS (shared pages such as Ray's object store counted once) of the whole
job's process tree (driver, Ray's own processes, workers, Ray Data tasks), polled every 0.5 s.
With `RAY_ADDRESS` set the job joins that cluster, whose processes are not the job's children: memory is
then not measured. Exit codes: 0 every stage passed, 1 a stage failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

logger = logging.getLogger("coco_rehearsal")

VARIANTS = ("sd_detr", "conditional_detr")
VARIANT_CONFIG = {"sd_detr": None, "conditional_detr": "configs/variants/conditional_detr.yaml"}
WEIGHTS_FILE = "resnet50-0676ba61.pth"  # torchvision's file name of its ImageNet ResNet-50 (V1)
EXPERIMENT = "sd-detr-coco"  # configs/coco_r50.yaml's tracking.experiment
CLUSTER_SCALING = ("scaling.num_workers=8", "scaling.use_gpu=true")
"""The README's cluster command: 8 GPU workers (the paper's batch of 16)."""
GPU_SCALING = ("scaling.num_workers=1", "scaling.use_gpu=true")
"""One GPU machine: the README's local command and the rehearsal with --gpu."""
CPU_SCALING = ("scaling.num_workers=2", "scaling.use_gpu=false", "scaling.cpus_per_worker=0.5")
"""One CPU machine (2 cores): 2 workers at 0.5 CPU leave one CPU for Ray Data's decode tasks."""
SIZE_OVERRIDES: dict[str, tuple[str, ...]] = {
    "full": (),  # configs/coco_r50.yaml as it is: 300 queries, d256, 6+6 layers, FFN 2048, 480-800 / 1333
    "reduced": (  # CI: the same images, backbone, weights file and 300 queries; a shallower transformer
        "model.transformer.num_encoder_layers=1",
        "model.transformer.num_decoder_layers=2",
        "model.transformer.ffn_dim=512",
    ),
}


def convert_command(python: str, coco_root: str, shards_root: str, split: str) -> list[str]:
    """The README's conversion of one COCO split (`<coco_root>` laid out as COCO 2017) into shards."""
    return [
        python, "pipelines/prepare_data.py", "coco",
        "--annotations", f"{coco_root}/annotations/instances_{split}2017.json",
        "--images", f"{coco_root}/{split}2017",
        "--out", f"{shards_root}/{split}",
    ]  # fmt: skip


def train_command(python: str, shards_root: str, weights: str, storage: str, variant: str) -> list[str]:
    """The README's training command without its scaling overrides (`CLUSTER_SCALING`, `GPU_SCALING`)."""
    configs = ["--config", "configs/coco_r50.yaml"]
    if VARIANT_CONFIG[variant] is not None:
        configs += ["--config", VARIANT_CONFIG[variant]]
    overrides = [
        f"data.train_dir={shards_root}/train",
        f"data.val_dir={shards_root}/val",
        f"model.backbone.weights_path={weights}",
        f"training.storage_path={storage}",
    ]
    return [python, "pipelines/train.py", *configs, *[arg for o in overrides for arg in ("--set", o)]]


def with_overrides(command: list[str], overrides: Sequence[str]) -> list[str]:
    return [*command, *[arg for o in overrides for arg in ("--set", o)]]


def readme_commands() -> dict[str, list[list[str]]]:
    """The COCO commands the README shows, built by the same functions the rehearsal runs.

    `cluster`: inside the project's containers (COCO mounted at `/coco`, shared storage at `/shared`);
    `local`: one GPU machine, from the checkout (COCO in `coco/`, weights in `weights/`). The README shows the
    SD-DETR training command; the baseline is the same with `VARIANT_CONFIG["conditional_detr"]` layered on.
    """
    return {
        "cluster": [
            *(convert_command("python", "/coco", "/shared/data/coco", split) for split in ("train", "val")),
            with_overrides(
                train_command(
                    "python", "/shared/data/coco", f"/shared/weights/{WEIGHTS_FILE}", "/shared/ray_results", "sd_detr"
                ),
                CLUSTER_SCALING,
            ),
        ],
        "local": [
            *(convert_command(".venv/bin/python", "coco", "coco/shards", split) for split in ("train", "val")),
            with_overrides(
                train_command(".venv/bin/python", "coco/shards", f"weights/{WEIGHTS_FILE}", "ray_results", "sd_detr"),
                GPU_SCALING,
            ),
        ],
    }


# ---------------------------------------------------------------------------------------------------- memory


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])  # fields after "(comm)": state, ppid, ...
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _descendants(root: int) -> list[int]:
    children, found, stack = _children_map(), [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def _status_kib(pid: int, key: str) -> int:
    """A `kB` field of /proc/<pid>/status (0 when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kib(pid: int) -> int:
    """Proportional set size (shared pages split among the processes that map them; 0 when gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _is_train_worker(pid: int) -> bool:
    try:
        return b"RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _gpu_memory_mib() -> dict[int, float]:
    """{pid: MiB} of the processes that hold GPU memory (empty without nvidia-smi)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}
    memory = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].replace(".", "", 1).isdigit():
            memory[int(parts[0])] = float(parts[1])
    return memory


@dataclass
class MemoryMonitor:
    """Polls the process tree under `root` every `interval_s` seconds (a background thread)."""

    root: int
    gpu: bool
    interval_s: float = 0.5
    worker_peak_mib: float = 0.0  # largest VmHWM of a Ray Train worker process
    tree_peak_mib: float = 0.0  # largest summed PSS of the tree (the object store's shared pages counted once)
    gpu_peak_mib: float = 0.0  # largest per-process GPU memory among the tree's processes
    workers_seen: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> MemoryMonitor:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        workers: set[int] = set()
        while not self._stop.is_set():
            pids = _descendants(self.root)
            self.tree_peak_mib = max(self.tree_peak_mib, sum(_pss_kib(p) for p in pids) / 1024)
            for pid in pids:
                if pid in workers or _is_train_worker(pid):
                    workers.add(pid)
                    self.worker_peak_mib = max(self.worker_peak_mib, _status_kib(pid, "VmHWM") / 1024)
            self.workers_seen = len(workers)
            if self.gpu:
                tree = set(pids)
                used = [mib for pid, mib in _gpu_memory_mib().items() if pid in tree]
                self.gpu_peak_mib = max([self.gpu_peak_mib, *used])
            self._stop.wait(self.interval_s)


# ---------------------------------------------------------------------------------------------------- stages


_PROGRESS_BAR = re.compile(r"\d+%\|")


class StageError(RuntimeError):
    """A rehearsal stage failed; the message says which and why."""


def run_logged(command: list[str], log_path: Path, label: str, env: dict[str, str], gpu: bool = False):
    """Run `command` from the repository root, echo its output through logging and into `log_path`.

    Returns (exit code, output text, MemoryMonitor of its process tree).
    """
    logger.info("[%s] $ %s", label, shlex.join(command))
    lines: list[str] = []
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        monitor = MemoryMonitor(process.pid, gpu).start()
        try:
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                lines.append(line)
                if not _PROGRESS_BAR.search(line):  # progress bars stay in the log file
                    logger.info("[%s] %s", label, line.rstrip()[:400])
            code = process.wait()
        finally:
            if process.poll() is None:
                process.kill()
            monitor.stop()
    return code, "".join(lines), monitor


def generate_source(coco_root: Path, num_train: int, num_val: int, seed: int, third_party: bool) -> None:
    from sd_detr.data.coco_like import generate

    started = time.perf_counter()
    options = {"include_iscrowd": False, "include_area": False, "include_annotation_ids": False} if third_party else {}
    splits = generate(coco_root, num_train, num_val, seed=seed, **options)
    for name, split in splits.items():
        logger.info("generated %s: %d images, %d annotations (%s)", name, split.num_images, split.num_annotations,
                    split.annotations)  # fmt: skip
    logger.info("generation took %.1f s", time.perf_counter() - started)


def save_backbone_weights(path: Path) -> None:
    """torchvision's ResNet-50 state_dict (random init: nothing is downloaded) with torchvision's key names."""
    import torch
    import torchvision

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    logger.info("saved a torchvision ResNet-50 state_dict (random weights) to %s (%.0f MB)", path,
                path.stat().st_size / 1e6)  # fmt: skip


@dataclass
class VariantResult:
    """What one variant's training job did."""

    variant: str
    exit_code: int
    wall_s: float
    steps: int | None = None
    train_s: float = math.nan
    images_per_s: float = math.nan  # over all workers
    data_wait_s: float = math.nan
    first_batch_s: float = math.nan
    val_s: float = math.nan
    val_ap: float = math.nan
    val_ap_epoch0: bool = False
    registered_versions: int = 0
    worker_peak_mib: float = math.nan
    tree_peak_mib: float = math.nan
    gpu_peak_mib: float = math.nan
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.val_ap_epoch0 and self.registered_versions > 0 and not self.problems


def _steps_from_output(output: str) -> int | None:
    """The last `[epoch 0] step N` progress line of rank 0 (`training.log_every_steps=1`)."""
    steps = [int(m) for m in re.findall(r"\[epoch 0\] step (\d+)", output)]
    return max(steps) if steps else None


def read_tracking(result: VariantResult, tracking_uri: str, run_name: str, model_name: str) -> None:
    """Fill `result` from the MLflow run named `run_name` and the registry."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{run_name}'") if experiment else []
    if not runs:
        result.problems.append(f"no MLflow run named {run_name!r} in experiment {EXPERIMENT!r}")
        return
    run = runs[0]
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_AP")}
    result.val_ap_epoch0 = 0 in history
    if not result.val_ap_epoch0:
        result.problems.append("the MLflow run has no val_AP for epoch 0")
    metrics = run.data.metrics
    result.val_ap = history.get(0, math.nan)
    result.train_s = metrics.get("train_epoch_seconds", math.nan)
    result.images_per_s = metrics.get("train_images_per_s", math.nan)
    result.data_wait_s = metrics.get("train_data_wait_s", math.nan)
    result.first_batch_s = metrics.get("train_first_batch_s", math.nan)
    result.val_s = metrics.get("val_seconds", math.nan)
    for name, value in metrics.items():  # a worker that reports its CUDA peak wins over nvidia-smi
        if "max_memory_allocated" in name or name.endswith("peak_memory_mib"):
            result.gpu_peak_mib = value
    result.registered_versions = len(client.search_model_versions(f"name = '{model_name}'"))
    if not result.registered_versions:
        result.problems.append(f"no registered version of model {model_name!r}")


def train_variant(
    variant: str, work: Path, shards_root: Path, weights: Path, args: argparse.Namespace, env: dict[str, str]
) -> VariantResult:
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    run_name, model_name = f"coco-rehearsal-{variant}", f"coco-rehearsal-{variant}"
    command = train_command(sys.executable, str(shards_root), str(weights), str(work / "shared" / "ray_results"),
                            variant)  # fmt: skip
    overrides = [
        *(GPU_SCALING if args.gpu else CPU_SCALING),
        *SIZE_OVERRIDES[args.size],
        "optimizer.epochs=1",
        f"training.run_name={run_name}",
        "training.log_every_steps=1",
        f"tracking.tracking_uri={tracking_uri}",
        f"tracking.artifact_root={work / 'mlartifacts'}",
        f"tracking.model_name={model_name}",
        *args.set,
    ]
    started = time.perf_counter()
    code, output, monitor = run_logged(
        with_overrides(command, overrides), work / "logs" / f"train-{variant}.log", f"train {variant}", env, args.gpu
    )
    result = VariantResult(variant, code, time.perf_counter() - started, steps=_steps_from_output(output))
    if monitor.workers_seen:
        result.worker_peak_mib, result.tree_peak_mib = monitor.worker_peak_mib, monitor.tree_peak_mib
    if args.gpu and monitor.gpu_peak_mib:
        result.gpu_peak_mib = monitor.gpu_peak_mib
    if code != 0:
        result.problems.append(f"pipelines/train.py exited with {code} (log: {work / 'logs' / f'train-{variant}.log'})")
    try:
        read_tracking(result, tracking_uri, run_name, model_name)
    except Exception as error:  # a missing store after a failed job: report, do not hide the job's failure
        result.problems.append(f"reading MLflow failed: {error}")
    return result


def _fmt(value: float | int | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def worker_count(args: argparse.Namespace) -> int:
    """Train workers of the jobs: the scaling of ``--gpu`` (1) or the CPU default (2), unless a ``--set
    scaling.num_workers=N`` overrides it (the last one wins, as in the job's config)."""
    count = 0
    for override in (*(GPU_SCALING if args.gpu else CPU_SCALING), *args.set):
        key, _, value = override.partition("=")
        if key.strip() == "scaling.num_workers":
            count = int(value)
    return count


def _share(part: float, whole: float) -> float:
    return part / whole if whole > 0 else math.nan


def results_table(results: list[VariantResult], workers: int, gpu: bool) -> str:
    """A markdown table, one row per variant. Data-wait share = `train_data_wait_s / train_epoch_seconds`,
    also without the wait for the first batch (the input pipeline's start)."""
    memory = "peak GPU MiB (per process)" if gpu else "peak MiB: worker RSS / job PSS"
    lines = [
        f"| variant | status | steps | train s | steps/s | images/s per worker | {memory} | data-wait share "
        "(after 1st batch) | eval s | val AP (epoch 0) | registered | job wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        steps_per_s = r.steps / r.train_s if r.steps and r.train_s > 0 else math.nan
        mem = _fmt(r.gpu_peak_mib, 0) if gpu else f"{_fmt(r.worker_peak_mib, 0)} / {_fmt(r.tree_peak_mib, 0)}"
        wait = _share(r.data_wait_s, r.train_s)
        later_wait = _share(r.data_wait_s - r.first_batch_s, r.train_s - r.first_batch_s)
        lines.append(
            f"| {r.variant} | {'ok' if r.ok else 'FAILED'} | {_fmt(r.steps)} | {_fmt(r.train_s, 1)} | "
            f"{_fmt(steps_per_s, 3)} | {_fmt(r.images_per_s / workers, 3)} | {mem} | "
            f"{_fmt(wait, 2)} ({_fmt(later_wait, 2)}) | {_fmt(r.val_s, 1)} | "
            f"{_fmt(r.val_ap, 4)} | {'yes' if r.registered_versions else 'no'} | {_fmt(r.wall_s, 0)} |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZE_OVERRIDES), default="full",
                        help="full: configs/coco_r50.yaml's model; reduced: 1+2 layers, FFN 512 (same images)")  # fmt: skip
    parser.add_argument("--images", type=int, default=16, help="train images (default 16: 4 steps on 2 CPU workers)")
    parser.add_argument("--val-images", type=int, default=8, dest="val_images", help="val images (default 8)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="default: both")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument("--third-party", action="store_true", dest="third_party",
                        help="source json without iscrowd, area and annotation ids (a third-party export)")  # fmt: skip
    parser.add_argument("--work-dir", type=Path, dest="work_dir",
                        help="keep everything here (must be empty or absent; default: a temporary directory)")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    parser.add_argument("--gpu", action="store_true", help="one GPU worker (use_gpu, bf16) instead of 2 CPU workers")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override for both training jobs (e.g. data.loader.batch_size=4)")  # fmt: skip
    return parser


def rehearse(args: argparse.Namespace, work: Path) -> tuple[list[str], list[VariantResult]]:
    """Run the stages in `work`; returns (failed stage names, per-variant results)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    coco_root, shards_root = work / "coco", work / "shared" / "data" / "coco"
    weights = work / "shared" / "weights" / WEIGHTS_FILE
    (work / "logs").mkdir(parents=True, exist_ok=True)
    try:
        generate_source(coco_root, args.images, args.val_images, args.seed, args.third_party)
        for split in ("train", "val"):
            command = convert_command(sys.executable, str(coco_root), str(shards_root), split)
            code, _, _ = run_logged(command, work / "logs" / f"convert-{split}.log", f"convert {split}", env)
            if code != 0:
                raise StageError(f"converting {split} exited with {code}")
        shutil.rmtree(coco_root)
        logger.info("deleted the source folder %s: training sees only %s", coco_root, shards_root)
        save_backbone_weights(weights)
    except (StageError, OSError, ValueError) as error:
        logger.error("data preparation failed: %s", error)
        return ["prepare"], []
    results = []
    for variant in args.variants:
        result = train_variant(variant, work, shards_root, weights, args, env)
        for problem in result.problems:
            logger.error("[train %s] %s", variant, problem)
        results.append(result)
    return [f"train {r.variant}" for r in results if not r.ok], results


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.images < 1 or args.val_images < 1:
        logger.error("--images and --val-images must be at least 1")
        return 2
    if args.work_dir is not None and args.work_dir.exists() and any(args.work_dir.iterdir()):
        logger.error("--work-dir %s is not empty", args.work_dir)
        return 2
    work = (args.work_dir or Path(tempfile.mkdtemp(prefix="coco-rehearsal-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    keep = args.keep or args.work_dir is not None
    started = time.perf_counter()
    logger.info("COCO rehearsal in %s: --size %s, %d train / %d val images, %s, variants %s", work, args.size,
                args.images, args.val_images, "1 GPU worker" if args.gpu else "2 CPU workers", args.variants)  # fmt: skip
    try:
        failed, results = rehearse(args, work)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    workers = worker_count(args)
    logger.info(
        "machine: %s, %d CPUs, python %s; %s; total %.0f s",
        platform.platform(), os.cpu_count() or 0, platform.python_version(),
        datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), time.perf_counter() - started,
    )  # fmt: skip
    if results:
        logger.info("results (%d train / %d val images, --size %s):\n%s", args.images, args.val_images, args.size,
                    results_table(results, workers, args.gpu))  # fmt: skip
    if keep:
        logger.info("work directory kept: %s (logs in %s)", work, work / "logs")
    if failed:
        logger.error("FAILED: %s", ", ".join(failed))
        return 1
    logger.info("every stage passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
