"""Bad input, in one place: a table of cases -> exit code and the start of the one line the user sees.

Each row builds its files in a fresh folder (``World``) and returns the command line; the run must exit with
``code`` and print exactly one ``error:`` line matching ``line`` from its start (rows with code 0 expect a
``warning:`` line instead), no traceback, and leave nothing half-written. Rows cover folders, stacks, embedding
caches, packages, manifests, and outputs that would destroy inputs. A new feature adds its rows to CASES.

The tiny random-weight export of tests/conftest.py keeps the whole table fast.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from peft_export.data.samples import sha256_file
from peft_export.files import stray_files


class World:
    """A fresh folder with the tiny export, its checkpoint, and helpers that make bad input."""

    def __init__(self, tmp: Path, export, run_cli):
        self.tmp, self.export, self.checkpoint, self.run_cli = tmp, Path(export.out_dir), Path(export.checkpoint), \
            run_cli

    def p(self, rel: str) -> Path:
        path = self.tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def image(self, rel: str, shape=(96, 112), seed=0) -> str:
        import tifffile
        from PIL import Image

        rng = np.random.default_rng(seed)
        arr = (rng.random(shape) * 200 + 20).astype(np.uint8)
        path = self.p(rel)
        if path.suffix == ".png":
            Image.fromarray(arr).save(path)
        elif len(shape) == 3:
            tifffile.imwrite(path, arr, photometric="minisblack", metadata={"axes": "ZYX"})
        else:
            tifffile.imwrite(path, arr)
        return str(path)

    def boxes(self) -> str:
        path = self.p("boxes.json")
        path.write_text(json.dumps([[5, 5, 40, 40]]))
        return str(path)

    def export_copy(self, edit: Callable[[Path, dict], None] | None = None) -> str:
        """A copy of the export whose manifest ``edit(folder, manifest_dict)`` changes."""
        dst = self.tmp / "export"
        shutil.copytree(self.export, dst)
        if edit is not None:
            doc = json.loads((dst / "manifest.json").read_text())
            edit(dst, doc)
            (dst / "manifest.json").write_text(json.dumps(doc))
        return str(dst)

    def package(self, edit: Callable[[Path, dict], None] | None = None, *, zipped: bool = False,
                members: dict[str, bytes] | None = None) -> str:
        """A minimal package (rdf.yaml + the export's encoder as its weights) that ``edit`` breaks."""
        import yaml

        folder = self.tmp / "pkg"
        folder.mkdir()
        shutil.copy2(self.export / "encoder.onnx", folder / "encoder.onnx")
        rdf = {"type": "model", "format_version": "0.5.4", "name": "bad",
               "weights": {"onnx": {"source": "encoder.onnx", "sha256": sha256_file(folder / "encoder.onnx")}},
               "config": {"peft_export": {"kind": "encoder"}}}
        if edit is not None:
            edit(folder, rdf)
        (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf))
        if not zipped:
            return str(folder)
        path = self.tmp / "pkg.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for p in folder.iterdir():
                zf.write(p, p.name)
            for name, data in (members or {}).items():
                zf.writestr(name, data)
        return str(path)

    def cli(self, *args: str) -> None:
        code, _, err = self.run_cli(*map(str, args))
        assert code == 0, err

    def cache(self, image: str) -> Path:
        cache = self.tmp / "cache"
        self.cli("embed", self.export, image, "-o", cache, "-q")
        return cache


def _edit_entry(key: str, value):
    def edit(folder: Path, doc: dict) -> None:
        if value is None:
            doc["files"]["encoder"].pop(key)
        else:
            doc["files"]["encoder"][key] = value

    return edit


def _link_out(folder: Path, doc: dict) -> None:
    outside = folder.parent / "elsewhere" / "encoder.onnx"
    outside.parent.mkdir()
    shutil.move(folder / "encoder.onnx", outside)
    (folder / "encoder.onnx").symlink_to(outside)


def _modify(folder: Path, doc: dict) -> None:
    data = bytearray((folder / "encoder.onnx").read_bytes())
    data[-20] ^= 0xFF
    (folder / "encoder.onnx").write_bytes(bytes(data))


def _weights(key: str, value):
    def edit(folder: Path, rdf: dict) -> None:
        if value is None:
            rdf["weights"]["onnx"].pop(key)
        else:
            rdf["weights"]["onnx"][key] = value

    return edit


def _pkg_link_out(folder: Path, rdf: dict) -> None:
    outside = folder.parent / "elsewhere.onnx"
    shutil.move(folder / "encoder.onnx", outside)
    (folder / "encoder.onnx").symlink_to(outside)


def _foreign(rel: str, data: bytes):
    def make(w: World) -> list:
        w.image("plate/a.tif")
        w.p(f"labels/{rel}").write_bytes(data)
        return ["predict", w.export, w.tmp / "plate", "--boxes", w.boxes(), "-o", w.tmp / "labels"]

    return make


def _other_exports_outputs(w: World) -> list:
    w.image("plate/a.tif")
    w.cli("predict", w.export, w.tmp / "plate", "--boxes", w.boxes(), "-o", w.tmp / "labels", "-q")
    doc = json.loads((w.tmp / "labels" / "a.json").read_text())
    doc["export"]["sha256"] = "0" * 64
    (w.tmp / "labels" / "a.json").write_text(json.dumps(doc))
    return ["predict", w.export, w.tmp / "plate", "--boxes", w.boxes(), "-o", w.tmp / "labels", "--skip-existing"]


def _changed_cache_entry(w: World) -> list:
    image = w.image("big.tif", (300, 280))
    cache = w.cache(image)
    npy = next(cache.glob("*.npy"))
    data = bytearray(npy.read_bytes())
    data[-8:] = b"\x00" * 8  # same size, other numbers
    npy.write_bytes(bytes(data))
    return ["predict", w.export, image, "--boxes", w.boxes(), "-o", w.tmp / "cached.tif", "--embeddings", cache]


def _same_labels_as_without_cache(w: World) -> None:
    import tifffile

    w.cli("predict", w.export, w.tmp / "big.tif", "--boxes", w.boxes(), "-o", w.tmp / "fresh.tif", "-q")
    assert np.array_equal(tifffile.imread(w.tmp / "cached.tif"), tifffile.imread(w.tmp / "fresh.tif"))
    for entry in (w.tmp / "cache").glob("*.json"):  # the changed entry was recomputed and rewritten
        doc = json.loads(entry.read_text())
        if "npy_sha256" in doc:
            assert sha256_file(entry.with_suffix(".npy")) == doc["npy_sha256"]


def _old_cache_entry(w: World) -> list:
    image = w.image("big.tif", (300, 280))
    cache = w.cache(image)
    entry = next(p for p in cache.glob("*.json") if p.name != "cache.json")
    doc = json.loads(entry.read_text())
    doc.pop("npy_sha256")
    entry.write_text(json.dumps(doc))
    return ["predict", w.export, image, "--boxes", w.boxes(), "-o", w.tmp / "l.tif", "--embeddings", cache]


def _other_exports_cache(w: World) -> list:
    image = w.image("a.tif")
    cache = w.cache(image)
    doc = json.loads((cache / "cache.json").read_text())
    doc["export"]["encoder_sha256"] = "0" * 64
    (cache / "cache.json").write_text(json.dumps(doc))
    return ["predict", w.export, image, "--boxes", w.boxes(), "-o", w.tmp / "l.tif", "--embeddings", cache]


def _not_a_cache(w: World) -> list:
    w.p("notes/todo.txt").write_text("mine")
    return ["predict", w.export, w.image("a.tif"), "--boxes", w.boxes(), "-o", w.tmp / "l.tif", "--embeddings",
            w.tmp / "notes"]


def _stack_shapes(w: World) -> list:
    import tifffile

    path = w.p("odd_stack.tif")
    tifffile.imwrite(path, np.zeros((64, 64), np.uint8))
    tifffile.imwrite(path, np.zeros((32, 64), np.uint8), append=True)
    return ["predict", w.export, path, "--auto", "-o", w.tmp / "l.tif"]


def _zcyx(w: World) -> list:
    import tifffile

    path = w.p("zc.tif")
    tifffile.imwrite(path, np.zeros((2, 2, 48, 48), np.uint8), photometric="minisblack",
                     metadata={"axes": "ZCYX"})
    return ["predict", w.export, path, "--auto", "-o", w.tmp / "l.tif"]


def _symlink(w: World, link: str, target: str) -> Path:
    path = w.p(link)
    path.symlink_to(target)
    return path


def _run_folder(w: World) -> Path:
    run = w.tmp / "run"
    run.mkdir()
    shutil.copy2(w.checkpoint, run / "best.pt")
    return run


def _labelled(w: World) -> str:
    import tifffile
    from conftest import disk_image

    img, lab = disk_image(np.random.default_rng(0), size=64)
    tifffile.imwrite(w.p("data/images/x.tif"), img)
    tifffile.imwrite(w.p("data/labels/x.tif"), lab.astype(np.uint16))
    return str(w.tmp / "data")


def _gate_outside(w: World) -> list:
    """A CPU gate record whose int8 encoder (a real OpenVINO IR, sha256s matching) lies outside the export folder."""
    pytest.importorskip("openvino", reason="needs the openvino extra")
    import openvino as ov

    elsewhere = w.p("elsewhere/enc.xml")
    ov.save_model(ov.convert_model(str(w.export / "encoder.onnx")), str(elsewhere))

    def edit(folder: Path, doc: dict) -> None:
        record = {"format": "peft-export-cpu-gate", "format_version": 1,
                  "encoder_sha256": doc["files"]["encoder"]["sha256"], "threshold": 0.95,
                  "precisions": {"int8": {"passed": True, "latency_ratio": 0.5,
                                          "file": str(elsewhere), "file_sha256": sha256_file(elsewhere),
                                          "weights": str(elsewhere.with_suffix(".bin")),
                                          "weights_sha256": sha256_file(elsewhere.with_suffix(".bin"))}}}
        (folder / "cpu_gate.json").write_text(json.dumps(record))

    return ["predict", w.export_copy(edit), w.image("a.tif"), "--boxes", w.boxes(), "-o", w.tmp / "l.tif",
            "--backend", "openvino", "--inference-precision", "int8"]


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[World], list]
    code: int
    line: str  # regex matched at the start of the one error: line (the warning: line for code 0)
    check: Callable[[World], None] | None = None


CASES = [
    # ---- folders and outputs of predict ----
    Case("folder: a.tif and a.png would share an output",
         lambda w: (w.image("plate/a.tif"), w.image("plate/a.png"),
                    ["predict", w.export, w.tmp / "plate", "--auto", "-o", w.tmp / "labels"])[-1],
         2, r"error: .*a\.png and .*a\.tif would both write a\.tif"),
    Case("folder: -o the image folder itself (--force)",
         lambda w: (w.image("plate/a.tif"), ["predict", w.export, w.tmp / "plate", "--auto", "-o", w.tmp / "plate",
                                             "--force"])[-1],
         2, r"error: refusing to write .*plate: it is the input"),
    Case("folder: a label image this tool did not write", _foreign("a.tif", b"II*\x00 not ours"),
         2, r"error: 1 file\(s\) in the way were not written by peft-export \(first: .*a\.tif"),
    Case("folder: a summary this tool did not write", _foreign("a.json", b'{"note": "mine"}'),
         2, r"error: 1 file\(s\) in the way were not written by peft-export \(first: .*a\.json"),
    Case("folder: --skip-existing over another export's outputs", _other_exports_outputs,
         2, r"error: --skip-existing: 1 existing output\(s\) were made by another export"),
    Case("folder: -o an existing file",
         lambda w: (w.image("plate/a.tif"), w.p("labels.txt").write_text("x"),
                    ["predict", w.export, w.tmp / "plate", "--auto", "-o", w.tmp / "labels.txt"])[-1],
         2, r"error: .*labels\.txt is a file: a folder or glob of images needs an output folder"),
    Case("folder: no images in it",
         lambda w: (w.p("empty/readme.txt").write_text("x"),
                    ["predict", w.export, w.tmp / "empty", "--auto", "-o", w.tmp / "labels"])[-1],
         1, r"error: .*empty: no images in this folder"),
    Case("folder: an image without its prompt file",
         lambda w: (w.image("plate/a.tif"), w.image("plate/b.tif"), w.p("prompts/a.json").write_text("[[5,5,30,30]]"),
                    ["predict", w.export, w.tmp / "plate", "--boxes", w.tmp / "prompts", "-o", w.tmp / "l"])[-1],
         1, r"error: 1 of 2 input\(s\) failed .*first: .*b\.tif: no prompt file for b\.tif"),
    Case("image: -o the input image (--force)",
         lambda w: ["predict", w.export, w.image("a.tif"), "--auto", "-o", w.tmp / "a.tif", "--force"],
         2, r"error: refusing to write .*a\.tif: it is the input"),
    Case("image: -o a link to the input image (--force)",
         lambda w: ["predict", w.export, w.image("a.tif"), "--auto", "-o", _symlink(w, "out/l.tif", w.tmp / "a.tif"),
                    "--force"],
         2, r"error: refusing to write .*l\.tif: it is the input"),
    Case("image: --overlay onto the input image (--force)",
         lambda w: ["predict", w.export, w.image("a.png"), "--auto", "-o", w.tmp / "l.tif", "--overlay",
                    w.tmp / "a.png", "--force"],
         2, r"error: refusing to write .*a\.png: it is the input"),
    Case("image: --overlay onto its own label image (--force)",
         lambda w: ["predict", w.export, w.image("a.tif"), "--boxes", w.boxes(), "-o", w.tmp / "l.tif", "--overlay",
                    w.tmp / "l.tif", "--force"],
         2, r"error: --overlay .*l\.tif is the label image this run writes"),
    Case("image: --overlay onto its own summary",
         lambda w: ["predict", w.export, w.image("a.tif"), "--boxes", w.boxes(), "-o", w.tmp / "l.tif", "--overlay",
                    w.tmp / "l.json"],
         2, r"error: --overlay .*l\.json is the summary this run writes"),
    Case("image: -o an existing file this tool did not write",
         lambda w: (w.p("l.tif").write_bytes(b"mine"),
                    ["predict", w.export, w.image("a.tif"), "--auto", "-o", w.tmp / "l.tif"])[-1],
         2, r"error: output .*l\.tif already exists and was not written by peft-export"),
    # ---- stacks ----
    Case("stack: labels to a .png",
         lambda w: ["predict", w.export, w.image("stack.tif", (2, 64, 64)), "--boxes", w.boxes(), "-o",
                    w.tmp / "l.png"],
         2, r"error: stack\.tif is a stack \(2 planes\): write its labels to a \.tif"),
    Case("stack: planes of different shapes", _stack_shapes, 1, r"error: odd_stack\.tif: plane 1 is 32x64"),
    Case("stack: two axes besides height and width", _zcyx, 1, r"error: zc\.tif: .* has 2 axes besides height"),
    # ---- embedding caches ----
    Case("cache: an entry changed, same size", _changed_cache_entry, 0,
         r"warning: embedding cache entry [0-9a-f]+\.npy does not match its sha256 \(modified or corrupt\): "
         "recomputing it", _same_labels_as_without_cache),
    Case("cache: an entry without a sha256 (older cache)", _old_cache_entry, 0,
         r"warning: embedding cache entry [0-9a-f]+\.npy records no sha256"),
    Case("cache: another export's cache", _other_exports_cache, 1, r"error: .*cache holds embeddings of another"),
    Case("cache: a folder that is not a cache", _not_a_cache, 1, r"error: .*notes is not an embedding cache"),
    Case("cache: embed -o the export folder",
         lambda w: ["embed", w.export, w.image("a.tif"), "-o", w.export],
         2, r"error: refusing to write .*: it is an input of this command"),
    # ---- packages ----
    Case("package: a zip without rdf.yaml",
         lambda w: (w.p("z/readme.txt").write_text("x"), shutil.make_archive(str(w.tmp / "nordf"), "zip", w.tmp / "z"),
                    ["predict", w.tmp / "nordf.zip", w.image("a.tif"), "--auto", "-o", w.tmp / "l.tif"])[-1],
         1, r"error: .*nordf\.zip holds no rdf\.yaml"),
    Case("package: a zip without its model file",
         lambda w: ["predict", w.package(lambda f, r: (f / "encoder.onnx").unlink(), zipped=True), w.image("a.tif"),
                    "--auto", "-o", w.tmp / "l.tif"],
         1, r"error: the package's ONNX weights encoder\.onnx is missing"),
    Case("package: weights outside the package (..)",
         lambda w: ["predict", w.package(_weights("source", "../encoder.onnx")), w.image("a.tif"), "--auto", "-o",
                    w.tmp / "l.tif"],
         1, r"error: .*pkg: the package's ONNX weights points outside its folder \('\.\./encoder\.onnx'\)"),
    Case("package: weights as an absolute path",
         lambda w: ["predict", w.package(_weights("source", str(w.export / "encoder.onnx"))), w.image("a.tif"),
                    "--auto", "-o", w.tmp / "l.tif"],
         1, r"error: .*pkg: the package's ONNX weights points outside its folder"),
    Case("package: weights without a sha256",
         lambda w: ["predict", w.package(_weights("sha256", None)), w.image("a.tif"), "--auto", "-o", w.tmp / "l.tif"],
         1, r"error: .*pkg: the package's ONNX weights encoder\.onnx has no sha256"),
    Case("package: weights are a link out of the package",
         lambda w: ["predict", w.package(_pkg_link_out), w.image("a.tif"), "--auto", "-o", w.tmp / "l.tif"],
         1, r"error: .*pkg: the package's ONNX weights encoder\.onnx is a link that leaves its folder"),
    Case("package: weights modified",
         lambda w: ["predict", w.package(_modify), w.image("a.tif"), "--auto", "-o", w.tmp / "l.tif"],
         1, r"error: the package's ONNX weights encoder\.onnx does not match its sha256 in the rdf"),
    Case("package: a zip member with ..",
         lambda w: ["predict", w.package(zipped=True, members={"../evil.txt": b"x"}), w.image("a.tif"), "--auto",
                    "-o", w.tmp / "l.tif"],
         1, r"error: cannot read package .*pkg\.zip: .*unsafe path '\.\./evil\.txt'"),
    # ---- export manifests ----
    Case("manifest: a file outside the export (..)",
         lambda w: ["predict", w.export_copy(_edit_entry("path", "../encoder.onnx")), w.image("a.tif"), "--auto",
                    "-o", w.tmp / "l.tif"],
         1, r"error: .*export: the encoder file points outside its folder \('\.\./encoder\.onnx'\)"),
    Case("manifest: an absolute path",
         lambda w: ["predict", w.export_copy(_edit_entry("path", str(w.export / "encoder.onnx"))), w.image("a.tif"),
                    "--auto", "-o", w.tmp / "l.tif"],
         1, r"error: .*export: the encoder file points outside its folder"),
    Case("manifest: a link out of the export",
         lambda w: ["predict", w.export_copy(_link_out), w.image("a.tif"), "--auto", "-o", w.tmp / "l.tif"],
         1, r"error: .*export: the encoder file encoder\.onnx is a link that leaves its folder"),
    Case("manifest: a file without a sha256",
         lambda w: ["predict", w.export_copy(_edit_entry("sha256", None)), w.image("a.tif"), "--auto", "-o",
                    w.tmp / "l.tif"],
         1, r"error: .*export/manifest\.json: the encoder file has no sha256"),
    Case("manifest: a graph modified",
         lambda w: ["predict", w.export_copy(_modify), w.image("a.tif"), "--auto", "-o", w.tmp / "l.tif"],
         1, r"error: .*encoder\.onnx does not match its sha256 in the manifest"),
    Case("cpu gate: an int8 encoder outside the export (absolute path)", _gate_outside,
         1, r"error: .*export: the CPU gate's int8 encoder points outside its folder"),
    Case("export: a training checkpoint given to predict",
         lambda w: ["predict", w.checkpoint, w.image("a.tif"), "--auto", "-o", w.tmp / "l.tif"],
         1, r"error: .*best\.pt is a training checkpoint, not an export folder: export it first with "
            r"`peft-export merge-and-export .*best\.pt -o .*onnx`"),
    Case("export: a training checkpoint given to embed",
         lambda w: ["embed", w.checkpoint, w.image("a.tif"), "-o", w.tmp / "cache"],
         1, r"error: .*best\.pt is a training checkpoint, not an export folder: export it first with `peft-export "
            "merge-and-export"),
    Case("export: a training run folder given to predict",
         lambda w: ["predict", _run_folder(w), w.image("a.tif"), "--auto", "-o", w.tmp / "l.tif"],
         1, r"error: .*run is a training run folder, not an export folder: export its checkpoint with `peft-export "
            r"merge-and-export .*run/best\.pt -o .*run/onnx`"),
    Case("export: evaluate --backend onnxruntime on a checkpoint",
         lambda w: ["evaluate", w.checkpoint, "--backend", "onnxruntime"],
         2, r"error: .*best\.pt is a training checkpoint, not an export folder: --backend onnxruntime runs exports; "
            "make one with `peft-export merge-and-export"),
    Case("evaluate: an unknown prompt type",
         lambda w: ["evaluate", w.export, "--data", _labelled(w), "--prompts", "box,lasso"],
         2, r"error: --prompts: unknown value 'lasso'; choose from box, point, auto$"),
    Case("evaluate: no prompt type",
         lambda w: ["evaluate", w.export, "--data", _labelled(w), "--prompts", ""],
         2, r"error: --prompts: "),
    Case("evaluate: an unknown device",
         lambda w: ["evaluate", w.checkpoint, "--device", "tpu"],
         2, r"error: --device: unknown value 'tpu'; choose from auto, cpu, cuda$"),
    # ---- outputs of the other commands that would destroy their inputs ----
    Case("merge: -o the checkpoint (--force)",
         lambda w: ["merge", _run_folder(w) / "best.pt", "-o", w.tmp / "run" / "best.pt", "--force"],
         2, r"error: refusing to write .*best\.pt: it is the input"),
    Case("merge-and-export: -o the run folder (--force)",
         lambda w: ["merge-and-export", _run_folder(w) / "best.pt", "-o", w.tmp / "run", "--force"],
         2, r"error: refusing to write .*run: it holds the input .*best\.pt"),
    Case("export: -o a link to the run folder (--force)",
         lambda w: ["export", _run_folder(w) / "best.pt", "-o", _symlink(w, "link", w.tmp / "run"), "--force"],
         2, r"error: refusing to write .*link: it holds the input"),
    Case("package: -o a link to the test image (--force)",
         lambda w: ["package", w.export, "-o", _symlink(w, "p.zip", w.image("t.png")), "--test-image",
                    w.tmp / "t.png", "--author", "A", "--force"],
         2, r"error: refusing to write .*p\.zip: it is the input"),
    # ---- results that will be poor: a warning, not an error ----
    Case("image: --tile larger than the image",
         lambda w: ["predict", w.export, w.image("a.tif", (120, 100)), "--boxes", w.boxes(), "-o", w.tmp / "l.tif",
                    "--tile", "1024"],
         0, r"warning: a\.tif: the tile \(1024 px\) is larger than the 100x120 image"),
    Case("image: far smaller than the model input",
         lambda w: ["predict", w.export, w.image("a.tif", (40, 50)), "--boxes", w.boxes(), "-o", w.tmp / "l.tif"],
         0, r"warning: a\.tif: the 50x40 image is far smaller than the model input \(256 px\)"),
    Case("predict --auto without an instance decoder",
         lambda w: ["predict", w.export, w.image("a.tif", (64, 64)), "--auto", "--points-per-side", "4", "-o",
                    w.tmp / "l.tif"],
         0, r"warning: this model has no instance decoder: automatic segmentation falls back to a grid"),
    Case("evaluate --auto without an instance decoder",
         lambda w: ["evaluate", w.export, "--data", _labelled(w), "--auto"],
         0, r"warning: this model has no instance decoder: automatic segmentation falls back to a grid"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tiny_export, tmp_path, run_cli, caplog):
    w = World(tmp_path, tiny_export, run_cli)
    argv = [str(a) for a in case.argv(w)]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="peft_export"):
        code, _, err = run_cli(*argv)
    assert code == case.code, (argv, err)
    assert "Traceback" not in err and "internal error" not in err, err
    if case.code == 0:
        # warnings are log records (the CLI prints them as "warning: ..."; under pytest its handler is pytest's)
        warnings = [line for line in err.splitlines() if line.startswith("warning:")]
        warnings += [f"warning: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]
        assert any(re.match(case.line, line) for line in warnings), (err, warnings)
    else:
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, err
        assert re.match(case.line, errors[0]), errors[0]
        changed = [p for p, t in before.items() if not p.exists() or p.stat().st_mtime_ns != t]
        assert not changed, changed  # a refused run changes nothing
    assert not stray_files(tmp_path)
    if case.check is not None:
        case.check(w)


def test_help_names_the_export_argument(run_cli):
    for command in ("predict", "embed"):
        code, out, _ = run_cli(command, "--help")
        assert code == 0 and "EXPORT" in out and "OUT_DIR" not in out, out
