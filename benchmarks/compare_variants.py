"""Conditional DETR vs SD-DETR (and the paper's ablation steps) at an equal budget on the synthetic data.

    .venv/bin/python benchmarks/compare_variants.py --epochs 10 --seeds 0 1
    .venv/bin/python benchmarks/compare_variants.py --variants conditional_detr sd_detr --set optimizer.epochs=30

Every variant is `configs/default.yaml` + `configs/variants/<variant>.yaml`, trained by the real pipeline
(Ray Train, COCO evaluation, MLflow under --workdir) with the same data, schedule, backbone and seeds; only
the variant file differs. Prints one row per variant (mean ± spread over seeds) and each row's difference to
the first variant, measured in this run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipelines.config import DEFAULT_CONFIG, TrainJobConfig
from pipelines.training import run_training
from sd_detr.config import load_config

VARIANTS = Path(__file__).resolve().parents[1] / "configs" / "variants"
COLUMNS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "score_iou_spearman", "epoch_s"]


def variant_config(
    variant: str, seed: int, epochs: int, workdir: Path, overrides: list[str], invocation: str
) -> TrainJobConfig:
    """The job config of one (variant, seed): its run named after this ``invocation`` (a timestamp), so a rerun
    trains afresh instead of resuming (and reporting) an earlier invocation's run of the same name."""
    run_name = f"compare-{invocation}-{variant}-seed{seed}"
    return load_config(
        TrainJobConfig,
        [DEFAULT_CONFIG, VARIANTS / f"{variant}.yaml"],
        [
            f"optimizer.epochs={epochs}",
            f"training.seed={seed}",
            f"training.run_name={run_name}",
            f"training.storage_path={workdir / 'ray_results'}",
            f"tracking.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
            f"tracking.artifact_root={workdir / 'mlartifacts'}",
            "tracking.experiment=compare-variants",
            f"tracking.model_name=compare-{variant}",
            "tracking.register_model=false",
            *overrides,
        ],
    )


def train_variant(cfg: TrainJobConfig) -> dict[str, float]:
    """Train one (variant, seed) config and return its final-epoch val metrics and mean seconds per epoch."""
    outcome = run_training(cfg)
    client = MlflowClient(cfg.tracking.resolved_tracking_uri())
    metrics = client.get_run(outcome.run_id).data.metrics
    epoch_seconds = [m.value for m in client.get_metric_history(outcome.run_id, "train_epoch_seconds")]
    row = {name: metrics.get(f"val_{name}", float("nan")) for name in COLUMNS if name != "epoch_s"}
    row["epoch_s"] = statistics.mean(epoch_seconds) if epoch_seconds else float("nan")
    return row


def summarize(rows: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """Mean and half-range of each column over seeds."""
    summary = {}
    for name in COLUMNS:
        values = [r[name] for r in rows if r[name] == r[name]]
        if values:
            summary[name] = (statistics.mean(values), (max(values) - min(values)) / 2)
        else:
            summary[name] = (float("nan"), float("nan"))
    return summary


def markdown_table(results: dict[str, dict[str, tuple[float, float]]]) -> str:
    """Variants as rows (mean ± half-range over seeds), then each variant's difference to the first."""
    header = "| variant | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS) + "\n"
    lines = []
    for variant, summary in results.items():
        cells = [f"{m:.4f} ± {s:.4f}" if name != "epoch_s" else f"{m:.1f}" for name, (m, s) in summary.items()]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    reference_name, reference = next(iter(results.items()))
    for variant, summary in list(results.items())[1:]:
        cells = [f"{summary[n][0] - reference[n][0]:+.4f}" if n != "epoch_s" else
                 f"x{summary[n][0] / reference[n][0]:.2f}" for n in COLUMNS]  # fmt: skip
        lines.append(f"| {variant} − {reference_name} | " + " | ".join(cells) + " |")
    return header + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--variants", nargs="+", default=["conditional_detr", "ablation_dfl", "ablation_dfl_taq", "sd_detr"]
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--workdir", type=Path, default=Path("outputs/compare_variants"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args()
    for variant in args.variants:
        if not (VARIANTS / f"{variant}.yaml").is_file():
            parser.error(f"unknown variant {variant!r}: no configs/variants/{variant}.yaml")
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started, invocation = time.perf_counter(), time.strftime("%Y%m%d-%H%M%S")
    configs = {
        variant: [variant_config(variant, seed, args.epochs, workdir, args.set, invocation) for seed in args.seeds]
        for variant in args.variants
    }  # all validated before the first run
    results = {variant: summarize([train_variant(cfg) for cfg in variant_configs])
               for variant, variant_configs in configs.items()}  # fmt: skip
    epochs = sorted({cfg.optimizer.epochs for variant_configs in configs.values() for cfg in variant_configs})
    table = markdown_table(results)
    print(f"\n{len(args.variants)} variants x {len(args.seeds)} seeds x {'/'.join(map(str, epochs))} epochs "
          f"in {time.perf_counter() - started:.0f} s (runs compare-{invocation}-*)\n\n{table}")  # fmt: skip
    if args.out is not None:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
