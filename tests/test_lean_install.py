"""The runtime-only install (issue 22): a FRESH venv with `pip install '<project>[cpu]'` (no training extra) must run
`predict` on an export without importing torch or any CUDA library, and stay small (its size is printed).

Part of the README's test command (pip takes the wheels from its local cache / the registry). Skip it with
PEFT_EXPORT_SKIP_FRESH_VENV=1 (e.g. offline).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.environ.get("PEFT_EXPORT_SKIP_FRESH_VENV") == "1",
                                                   reason="PEFT_EXPORT_SKIP_FRESH_VENV=1")]

# distributions a runtime-only install must not contain
HEAVY = ("torch", "torchvision", "onnxruntime-gpu", "onnx", "segment-anything", "matplotlib", "tensorrt")


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


def test_runtime_only_install_in_a_fresh_venv(tiny_export, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    # as a user installs it: this checkout with the `cpu` extra (a copy, so the checkout stays clean)
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info", "build", "__pycache__",
                                                              "demo_run", ".pytest_cache", ".ruff_cache"))
    # --no-compile: pip would byte-compile every module (~9 s here, ~80 MiB) for nothing this test checks
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-compile", f"{src}[cpu]"], capture_output=True,
                         text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-3000:]
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True,
                            check=True).stdout
    dists = {d["name"].lower() for d in json.loads(listed)}
    assert not dists & set(HEAVY), sorted(dists & set(HEAVY))
    assert "onnxruntime" in dists and not any(d.startswith("nvidia") for d in dists), sorted(dists)

    image = tmp_path / "img.tif"
    import tifffile

    tifffile.imwrite(image, (np.random.default_rng(0).random((60, 80)) * 255).astype(np.uint8))
    (tmp_path / "boxes.json").write_text("[[5, 5, 40, 30]]")
    code = f"""
import sys
from peft_export_cli.app import main
code = main(["predict", {str(tiny_export.out_dir)!r}, {str(image)!r}, "--boxes", {str(tmp_path / "boxes.json")!r},
             "-o", {str(tmp_path / "labels.tif")!r}, "--json", "-q"])
assert code == 0, code
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "onnx", "tensorrt"))
assert not bad, bad
maps = open("/proc/self/maps").read() if sys.platform.startswith("linux") else ""
cuda = sorted({{line.split()[-1] for line in maps.splitlines() if any(k in line for k in ("libcuda", "libcudart",
        "libcublas", "libcudnn", "nvidia"))}})
assert not cuda, cuda
code = main(["finetune", "--model", "vit_tiny", "--data", "x", "--out", "y"])
assert code == 2, code
"""
    run = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
                              "PEFT_EXPORT_NO_COLOR": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "pip install 'peft-export[train]'" in run.stderr  # the training command named its extra in one line
    assert (tmp_path / "labels.tif").exists()
    size = _size_mb(venv)
    print(f"\nruntime-only venv ('peft-export[cpu]'): {size:.0f} MiB without bytecode, {len(dists)} distributions")
    assert size < 1024, size  # the full install with CUDA torch was 6.4 GB
