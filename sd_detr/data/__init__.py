"""Detection data without Ray: Parquet shards, the synthetic dataset, transforms and batching (docs/data.md)."""

from sd_detr.data.builtin import default_synthetic_root, ensure_synthetic_dataset
from sd_detr.data.coco import convert_coco_to_shards
from sd_detr.data.collate import DetectionBatch, pad_and_collate
from sd_detr.data.config import AugmentationConfig, ConvertConfig, LoaderConfig, SyntheticConfig
from sd_detr.data.dataset import ShardDataset, build_dataloader
from sd_detr.data.meta import DatasetMeta, GroundTruthNotFoundError, ground_truth_path, load_ground_truth, load_meta
from sd_detr.data.transforms import build_eval_transform, build_train_transform

__all__ = [
    "AugmentationConfig",
    "ConvertConfig",
    "DatasetMeta",
    "DetectionBatch",
    "GroundTruthNotFoundError",
    "LoaderConfig",
    "ShardDataset",
    "SyntheticConfig",
    "build_dataloader",
    "build_eval_transform",
    "build_train_transform",
    "convert_coco_to_shards",
    "default_synthetic_root",
    "ensure_synthetic_dataset",
    "ground_truth_path",
    "load_ground_truth",
    "load_meta",
    "pad_and_collate",
]
