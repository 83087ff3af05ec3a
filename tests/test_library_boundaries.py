"""sd_detr/ is a plain PyTorch library: importing all of it loads neither Ray nor MLflow."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import sd_detr


def test_sd_detr_imports_neither_ray_nor_mlflow() -> None:
    modules = [m.name for m in pkgutil.walk_packages(sd_detr.__path__, "sd_detr.")]
    assert "sd_detr.model" in modules and "sd_detr.losses" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"sd_detr pulled in: {result.stdout.strip()}"
