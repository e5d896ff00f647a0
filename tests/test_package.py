"""Packaging: the wheel installs `peft_export` + `peft_export_cli` only, and its console script works."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tomllib
from packaging.markers import Marker
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("finetune", "merge", "export", "merge-and-export", "build-engine", "benchmark", "predict",
            "evaluate", "info")


def _deps() -> list[Requirement]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [Requirement(r) for r in data["project"]["dependencies"]]


def test_exactly_one_onnxruntime_build_per_extra():
    """The base install lists no ONNX Runtime; the `cpu` extra has the CPU build, `gpu` the CUDA build, and no other
    extra lists either (both builds install the same `onnxruntime/` folder: never both)."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert not [r for r in _deps() if r.name.startswith("onnxruntime")]
    by_extra = {name: [Requirement(r).name for r in reqs if Requirement(r).name.startswith("onnxruntime")]
                for name, reqs in data["project"]["optional-dependencies"].items()}
    assert by_extra.pop("cpu") == ["onnxruntime"] and by_extra.pop("gpu") == ["onnxruntime-gpu"]
    assert not any(by_extra.values()), by_extra
    torch_free = {Requirement(r).name for r in data["project"]["dependencies"]}
    assert not torch_free & {"torch", "torchvision", "segment-anything", "onnx", "matplotlib"}, torch_free


def test_no_exact_pins():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = list(data["project"]["dependencies"])
    for extra in data["project"]["optional-dependencies"].values():
        reqs += extra
    for r in map(Requirement, reqs):
        assert not any(s.operator in ("==", "===") for s in r.specifier), r
    assert Marker  # packaging is importable for the marker test above


def test_wheel_installs_only_our_packages_and_runs(tmp_path):
    wheel_dir = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheel_dir), str(ROOT)], check=True, capture_output=True, timeout=600)
    (wheel,) = wheel_dir.glob("peft_export-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        tops = {n.split("/")[0] for n in zf.namelist() if not n.split("/")[0].endswith(".dist-info")}
        entry = zf.read(next(n for n in zf.namelist() if n.endswith("entry_points.txt"))).decode()
        has_napari_manifest = "peft_export/napari/napari.yaml" in zf.namelist()
    assert tops == {"peft_export", "peft_export_cli"}, tops
    assert "peft-export = peft_export_cli.app:run" in entry
    assert has_napari_manifest and "peft-export = peft_export.napari:napari.yaml" in entry  # the napari plugin
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    env = {**os.environ, "PYTHONPATH": str(target)}
    script = target / "bin" / "peft-export"
    out = subprocess.run([sys.executable, str(script), "--version"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"peft-export {md.version('peft-export')}"
    out = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0
    for cmd in COMMANDS:
        assert cmd in out.stdout, cmd
    where = subprocess.run([sys.executable, "-c", "import peft_export, peft_export_cli; "
                            "print(peft_export.__file__); print(peft_export_cli.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert all(line.startswith(str(target)) for line in where.stdout.split()), where.stdout


def test_installed_distribution_points_at_this_checkout():
    """`pip install -e .` maps the `cli/` folder to `peft_export_cli` (editable installs only)."""
    # the installed record (not the peft_export.egg-info folder an editable build leaves in the checkout)
    direct = next((d.read_text("direct_url.json") for d in md.distributions(name="peft-export")
                   if d.read_text("direct_url.json")), None)
    if not direct or not json.loads(direct).get("dir_info", {}).get("editable"):
        pytest.skip("peft-export is not installed in editable mode here")
    import peft_export_cli

    assert Path(peft_export_cli.__file__).resolve().parent == ROOT / "cli"


def test_help_lists_every_command(run_cli):
    code, out, _ = run_cli("--help")
    assert code == 0
    for cmd in COMMANDS:
        assert cmd in out


def test_version(run_cli):
    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"peft-export {md.version('peft-export')}"


def test_info_json(run_cli):
    code, out, _ = run_cli("info", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["versions"]["torch"]
    assert "CPUExecutionProvider" in data["devices"]["onnxruntime_providers"]
    assert data["samples"]["lite_medsam weights"].endswith("lite_medsam.pth")


# import name -> distribution, where they differ
_DIST_OF = {"yaml": "pyyaml", "PIL": "pillow", "onnx_ir": "onnx-ir", "skimage": "scikit-image",
            "segment_anything": "segment-anything", "cuda": "cuda-python", "onnxslim": "onnxslim",
            "onnxruntime": "onnxruntime", "bioimageio": "bioimageio.core", "torch_em": "torch-em"}
# optional integrations imported lazily behind a clear "install X" message (extras, or absent on purpose); the
# training side (`train` extra), the engines (`cpu`/`gpu`, `openvino`, `nncf`) and the napari plugin (`napari`)
# are extras of the torch-free base
_OPTIONAL = {"tensorrt", "cuda", "onnxslim", "bioimageio", "polygraphy", "micro_sam", "torch_em", "tomllib",
             "torch", "torchvision", "segment_anything", "onnx", "onnxscript", "onnx_ir", "matplotlib", "onnxruntime",
             "openvino", "nncf", "napari", "qtpy", "superqt"}


def _third_party_imports(root: Path) -> dict[str, str]:
    import ast

    std = set(sys.stdlib_module_names)
    found: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            for name in names:
                top = name.split(".")[0]
                if top not in std and top not in ("peft_export", "peft_export_cli"):
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_every_library_import_is_declared():
    """Each third-party module the library or the CLI imports is a dependency (or, when optional, an extra)."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = {Requirement(r).name.lower() for r in data["project"]["dependencies"]}
    extras = {Requirement(r).name.lower() for reqs in data["project"]["optional-dependencies"].values()
              for r in reqs}
    missing = []
    for top, where in {**_third_party_imports(ROOT / "peft_export"), **_third_party_imports(ROOT / "cli")}.items():
        dist = _DIST_OF.get(top, top).lower()
        if dist in declared or (top in _OPTIONAL and (dist in extras or top in ("micro_sam", "tomllib"))):
            continue
        missing.append(f"{top} ({where})")
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


# what a microscope PC needs for the torch-free runtime (the README's list: keep both in step)
RUNTIME_DISTRIBUTIONS = ("numpy", "scipy", "pillow", "tifffile", "scikit-image", "onnxruntime")
CLI_DISTRIBUTIONS = ("typer", "click", "rich", "pydantic", "pyyaml")


def _ort_dist() -> str:
    """The ONNX Runtime build installed here (the `cpu` extra's onnxruntime, or the `gpu` extra's)."""
    try:
        md.distribution("onnxruntime")
        return "onnxruntime"
    except md.PackageNotFoundError:
        return "onnxruntime-gpu"


def _closure(dists) -> set[str]:
    """The distributions and, recursively, what they require (without extras)."""
    seen: set[str] = set()
    todo = [d.lower() for d in dists]
    while todo:
        d = todo.pop()
        if d in seen:
            continue
        seen.add(d)
        try:
            reqs = md.requires(_ort_dist() if d == "onnxruntime" else d) or []
        except md.PackageNotFoundError:
            continue
        for r in (Requirement(x) for x in reqs):
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name.lower())
    return seen


def _modules_of(dists: set[str]) -> set[str]:
    dists = dists | ({_ort_dist()} if "onnxruntime" in dists else set())
    norm = {d.replace("_", "-") for d in dists}
    return {mod for mod, owners in md.packages_distributions().items()
            if any(o.lower().replace("_", "-") in norm for o in owners)}


def test_runtime_runs_with_only_its_listed_dependencies(tiny_export, tmp_path):
    """`peft-export predict` (and the Segmenter under it) in a process where importing anything but the standard
    library, our packages and the listed distributions (and what they require) fails: no torch, no onnx."""
    allowed = _modules_of(_closure(RUNTIME_DISTRIBUTIONS + CLI_DISTRIBUTIONS)) | {"peft_export", "peft_export_cli"}
    assert "torch" not in allowed and "onnx" not in allowed  # (typer itself requires pydantic)
    image = tmp_path / "img.tif"
    import tifffile

    tifffile.imwrite(image, (np.random.default_rng(0).random((60, 80)) * 255).astype(np.uint8))
    (tmp_path / "boxes.json").write_text("[[5, 5, 40, 30]]")
    code = f"""
import importlib.abc, sys
ALLOWED = {sorted(allowed)!r}
STD = set(sys.stdlib_module_names)
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in STD or top in ALLOWED or top.startswith("_"):
            return None
        raise ImportError(f"blocked: {{name}} is not a listed runtime dependency")
sys.meta_path.insert(0, Block())
from peft_export_cli.app import main
code = main(["predict", {str(tiny_export.out_dir)!r}, {str(image)!r}, "--boxes", {str(tmp_path / "boxes.json")!r},
             "-o", {str(tmp_path / "labels.tif")!r}, "--json"])
assert code == 0, code
assert "torch" not in sys.modules and "onnx" not in sys.modules
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PEFT_EXPORT_NO_COLOR": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "labels.tif").exists()
