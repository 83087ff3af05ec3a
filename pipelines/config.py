"""The job config of `pipelines/train.py` (and of each Tune trial): the detector config plus data,
cluster, fault-tolerance and tracking sections. Pure pydantic; validated before any cluster work."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from sd_detr.config import DetectorConfig, StrictModel
from sd_detr.data.config import AugmentationConfig, LoaderConfig, SyntheticConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"


class DataSection(StrictModel):
    """Where the shards are. Without ``train_dir``/``val_dir`` the built-in synthetic dataset is used
    (generated on first use under ``synthetic_root``)."""

    train_dir: Path | None = Field(None, description="Train shard directory (with _meta.json).")
    val_dir: Path | None = Field(None, description="Val shard directory; its COCO json is the ground truth.")
    synthetic_root: Path = Field(Path("data/synthetic"), description="Root of the built-in synthetic dataset.")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    augmentation: AugmentationConfig = Field(default_factory=AugmentationConfig)
    loader: LoaderConfig = Field(default_factory=LoaderConfig)

    @model_validator(mode="after")
    def _both_or_neither(self) -> DataSection:
        if (self.train_dir is None) != (self.val_dir is None):
            raise ValueError("data.train_dir and data.val_dir must be given together (or neither: synthetic)")
        return self


class ScalingSection(StrictModel):
    """Ray Train workers (DDP): gloo on CPU, nccl on CUDA."""

    num_workers: int = Field(2, ge=1, description="Training workers (DDP ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker (CUDA, nccl, AMP).")
    cpus_per_worker: float = Field(
        0.5, gt=0.0, description="Logical CPUs per worker; leave CPUs free for Ray Data (decode tasks)."
    )
    amp: Literal["none", "bf16", "fp16"] = Field("bf16", description="Autocast dtype on CUDA (ignored on CPU).")


class FaultInjection(StrictModel):
    """Test hook (off by default): kill one worker process once, after training epoch ``kill_after_epoch``."""

    kill_after_epoch: int | None = Field(None, ge=0, description="Epoch after whose training a worker dies.")
    rank: int = Field(1, ge=0, description="Which rank dies.")


RUN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
"""Run and sweep names: they become directory names in Ray's storage and MLflow run names."""


class TrainingSection(StrictModel):
    """Run identity, seeding, failure handling and reporting."""

    run_name: str = Field(
        "sd-detr-synthetic",
        pattern=RUN_NAME_PATTERN,
        description="Ray run name and MLflow run name; rerunning the same name resumes it.",
    )
    storage_path: str = Field(
        "ray_results", description="Ray Train storage: a local/NFS path or a URI such as s3://bucket/ray_results."
    )
    seed: int = Field(0, description="Seed of model init and training.")
    max_failures: int = Field(2, ge=0, description="Worker-group restarts from the last checkpoint.")
    checkpoints_to_keep: int = Field(2, ge=1, description="Best checkpoints kept (by val AP; the latest is kept too).")
    log_every_steps: int = Field(10, ge=1, description="Rank 0 prints progress every this many steps.")
    num_prediction_images: int = Field(4, ge=0, description="Val images drawn with predictions per eval.")
    compile: bool = Field(
        False,
        description="Compile the detector's encoder and decoder with torch.compile (TorchInductor, dynamic shapes; "
        "the backbone stays eager); the first steps compile (minutes on CPU). Same losses within float rounding. "
        "On a 2-core CPU training steps were slower, inference faster (docs/benchmarks.md); GPUs not measured.",
    )
    ray_console: Literal["quiet", "verbose"] = Field(
        "quiet",
        description="Ray's own lines in the job's console. 'quiet' drops Ray's routine lines that repeat every "
        "epoch or are known false alarms: Ray Train's 'Checkpoint successfully created', Ray Data's 'Dataset ... "
        "execution finished' and 'Progress bars disabled', the core worker's PreemptionWatcher 'constructor "
        "arguments in the object store' line, and Ray Data's INFO lines on the driver; errors, warnings, Ray "
        "Train's worker-group (re)start and failure-policy lines and the job's own progress lines stay. "
        "'verbose' shows everything Ray prints. Ray's log files are the same either way.",
    )
    fault_injection: FaultInjection = Field(default_factory=FaultInjection)


class TrackingSection(StrictModel):
    """MLflow: tracking store, experiment and model registry."""

    tracking_uri: str | None = Field(
        None, description="Tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///<abs>/mlflow.db."
    )
    artifact_root: Path = Field(
        Path("mlartifacts"), description="Artifact location of new experiments on a local (sqlite) store."
    )
    experiment: str = Field("sd-detr", min_length=1, description="MLflow experiment name.")
    model_name: str = Field("sd-detr-synthetic", min_length=1, description="Registered model name.")
    alias: str = Field("champion", min_length=1, description="Alias moved to a new version that beats it.")
    register_model: bool = Field(True, description="Log and register the best checkpoint's model at the end.")

    def resolved_tracking_uri(self) -> str:
        """The explicit URI, else ``$MLFLOW_TRACKING_URI``, else an absolute local SQLite store."""
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        return uri or f"sqlite:///{Path('mlflow.db').resolve()}"


class TrainJobConfig(DetectorConfig):
    """Everything `pipelines/train.py` needs: model, matcher, loss, optimizer, data, scaling, training,
    tracking. Relative paths are resolved against the driver's working directory."""

    data: DataSection = Field(default_factory=DataSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)

    @model_validator(mode="after")
    def _fault_rank_exists(self) -> TrainJobConfig:
        injection = self.training.fault_injection
        if injection.kill_after_epoch is not None and injection.rank >= self.scaling.num_workers:
            raise ValueError(
                f"training.fault_injection.rank {injection.rank} >= scaling.num_workers {self.scaling.num_workers}"
            )
        return self

    def with_absolute_paths(self) -> TrainJobConfig:
        """A copy whose paths (data, storage, tracking, backbone weights) are absolute (Ray workers run in other
        directories)."""
        data = self.data.model_copy(
            update={
                "train_dir": self.data.train_dir.resolve() if self.data.train_dir else None,
                "val_dir": self.data.val_dir.resolve() if self.data.val_dir else None,
                "synthetic_root": self.data.synthetic_root.resolve(),
            }
        )
        storage = self.training.storage_path
        if "://" not in storage:
            storage = str(Path(storage).resolve())
        training = self.training.model_copy(update={"storage_path": storage})
        model = self.model
        if model.backbone.weights_path is not None:
            weights = model.backbone.weights_path.expanduser().resolve()
            model = model.model_copy(update={"backbone": model.backbone.model_copy(update={"weights_path": weights})})
        tracking = self.tracking.model_copy(
            update={
                "tracking_uri": self.tracking.resolved_tracking_uri(),
                "artifact_root": self.tracking.artifact_root.resolve(),
            }
        )
        return self.model_copy(update={"model": model, "data": data, "training": training, "tracking": tracking})
