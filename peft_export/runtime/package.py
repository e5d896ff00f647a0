"""Run a bioimage.io model package made by ``peft-export package`` — numpy + ONNX Runtime, no torch, no bioimageio.

    seg = Segmenter("model.zip")           # a .zip, an unzipped package folder, or its rdf.yaml
    seg.set_image(image)
    labels = seg.segment()                 # instance packages: the maps + the recorded watershed
    masks = seg.predict(boxes=...).masks   # encoder packages: prompts, as with an export folder

Here: the package as a runtime backend (:func:`package_backend`, used by :func:`peft_export.runtime.backends.
open_model`). The package's own ``rdf.yaml`` drives the checks: weights file and sha256, the input's axes and data
type and its preprocessing steps (implemented here in numpy: ``scale_range``, ``scale_linear``,
``fixed_zero_mean_unit_variance``, ``zero_mean_unit_variance``, ``clip``, ``ensure_dtype``; :meth:`PackageModel.run`
applies them to a tensor in the declared axes, e.g. the package's test input). Images run through the export runtime
(its preprocessing recorded in the attached export manifest), tiled like any image.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from peft_export.data.samples import sha256_file
from peft_export.errors import DataError, UsageError, first_line
from peft_export.files import clean_stale, temp_path
from peft_export.manifest import FORMAT, FORMAT_VERSION, Manifest, read_json_document, verify_manifest_files
from peft_export.paths import member_path, required_sha256
from peft_export.runtime.onnx_backend import OnnxBackend, manifest_info, ort_session

RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
MANIFEST_ATTACHMENT = "peft_export_manifest.json"


def is_package(path: str | os.PathLike) -> bool:
    """A bioimage.io package: a .zip file, a folder holding an rdf.yaml / bioimageio.yaml, or that yaml file."""
    p = Path(path)
    if p.is_file():
        return p.suffix.lower() == ".zip" or p.name in RDF_NAMES
    return p.is_dir() and any((p / n).is_file() for n in RDF_NAMES)


def _rdf_path(folder: Path) -> Path:
    for name in RDF_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder} holds no rdf.yaml or bioimageio.yaml: not a bioimage.io package")


def unzip_root() -> Path:
    """Where opened .zip packages are unzipped: one folder per user in the system's temporary folder, entries named
    like every peft-export temporary (:mod:`peft_export.files`), so that what a killed process left is removed by
    the next one that opens a package."""
    root = Path(tempfile.gettempdir()) / f"peft-export-packages-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    root.mkdir(mode=0o700, exist_ok=True)
    return root


def _extract(zip_path: Path) -> Path:
    root = unzip_root()
    clean_stale(root)
    tmp = temp_path(root / zip_path.name)
    try:
        tmp.mkdir()
        with zipfile.ZipFile(zip_path) as zf:
            for info in zf.infolist():
                name = Path(info.filename)
                if name.is_absolute() or ".." in name.parts or "\\" in info.filename:
                    raise DataError(f"{zip_path}: unsafe path {info.filename!r} in the package")
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise DataError(f"{zip_path}: {info.filename!r} is a symbolic link: refused")
            zf.extractall(tmp)
    except (zipfile.BadZipFile, OSError, DataError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"cannot read package {zip_path}: {first_line(exc)}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _source(entry: dict, what: str) -> str:
    src = entry.get("source") if isinstance(entry, dict) else None
    if not isinstance(src, str) or "://" in src:
        raise DataError(f"the package's {what} is not a file inside the package ({src!r})")
    return src


def _check_file(folder: Path, entry: dict, what: str) -> Path:
    """A file the rdf names: inside the package (no absolute path, no ``..``, no link out), present, and matching
    its sha256, which is required."""
    p = member_path(folder, _source(entry, what), f"the package's {what}")
    want = required_sha256(entry, str(folder), f"the package's {what} {p.name}")
    if not p.is_file():
        raise DataError(f"the package's {what} {p.name} is missing")
    if sha256_file(p) != want:
        raise DataError(f"the package's {what} {p.name} does not match its sha256 in the rdf (modified or corrupt)")
    return p


# ---- the spec's preprocessing steps, in numpy ------------------------------------------------------------

def _reduce_axes(axis_ids: list[str], axes) -> tuple[int, ...] | None:
    if axes is None:
        return None
    return tuple(axis_ids.index(a) for a in axes)


def _along(value, axis_ids: list[str], axis: str | None, ndim: int) -> np.ndarray:
    v = np.asarray(value, np.float32)
    if axis is None or v.ndim == 0:
        return v
    shape = [1] * ndim
    shape[axis_ids.index(axis)] = v.size
    return v.reshape(shape)


def apply_step(x: np.ndarray, step: dict, axis_ids: list[str]) -> np.ndarray:
    """One bioimage.io 0.5 pre-processing step on ``x`` (axes in the order ``axis_ids``)."""
    sid, kw = step.get("id"), step.get("kwargs") or {}
    if sid == "ensure_dtype":
        return x.astype(np.dtype(kw["dtype"]))
    x = x.astype(np.float32, copy=False)
    if sid == "scale_range":
        red = _reduce_axes(axis_ids, kw.get("axes"))
        lo = np.percentile(x, kw.get("min_percentile", 0.0), axis=red, keepdims=True)
        hi = np.percentile(x, kw.get("max_percentile", 100.0), axis=red, keepdims=True)
        return ((x - lo) / (hi - lo + kw.get("eps", 1e-6))).astype(np.float32)
    if sid == "scale_linear":
        gain = _along(kw.get("gain", 1.0), axis_ids, kw.get("axis"), x.ndim)
        offset = _along(kw.get("offset", 0.0), axis_ids, kw.get("axis"), x.ndim)
        return (x * gain + offset).astype(np.float32)
    if sid == "fixed_zero_mean_unit_variance":
        mean = _along(kw["mean"], axis_ids, kw.get("axis"), x.ndim)
        std = _along(kw["std"], axis_ids, kw.get("axis"), x.ndim)
        return ((x - mean) / (std + 1e-6)).astype(np.float32)
    if sid == "zero_mean_unit_variance":
        red = _reduce_axes(axis_ids, kw.get("axes"))
        return ((x - x.mean(axis=red, keepdims=True)) / (x.std(axis=red, keepdims=True) + kw.get("eps", 1e-6))
                ).astype(np.float32)
    if sid == "clip":
        return np.clip(x, kw.get("min"), kw.get("max")).astype(np.float32)
    raise DataError(f"the package's preprocessing step {sid!r} is not implemented by the peft-export runtime "
                    "(scale_range, scale_linear, fixed_zero_mean_unit_variance, zero_mean_unit_variance, clip, "
                    "ensure_dtype); run it with bioimageio.core")


class PackageModel:
    """An opened package (see the module docstring). ``folder`` holds its files (a temporary copy for a .zip)."""

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None, *, threads: int | None = None):
        p = Path(path)
        if not p.exists():
            raise DataError(f"package not found: {p}")
        if not is_package(p):
            raise UsageError(f"{p} is not a bioimage.io package (.zip, a folder with rdf.yaml, or the rdf.yaml)")
        self._cleanup = None
        if p.is_file() and p.suffix.lower() == ".zip":
            self.folder = _extract(p)  # a private copy, removed with this object (or at exit)
            self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder, True)
        else:
            self.folder = p.parent if p.is_file() else p
        self.path = p
        try:
            self._open(p, providers, threads)
        except BaseException:
            self.close()  # an unzipped copy goes at once, not when the object is collected
            raise

    def _open(self, p: Path, providers, threads) -> None:
        import yaml

        try:
            rdf_path = member_path(self.folder, _rdf_path(self.folder).name, "the rdf")
            self.rdf = yaml.safe_load(rdf_path.read_text())
        except yaml.YAMLError as exc:
            raise DataError(f"{p}: its rdf is not valid YAML: {first_line(exc)}") from None
        except DataError:
            if self.folder != p:
                raise DataError(f"{p} holds no rdf.yaml or bioimageio.yaml: not a bioimage.io package") from None
            raise
        if not isinstance(self.rdf, dict) or self.rdf.get("type") != "model":
            raise DataError(f"{p} is not a bioimage.io model package")
        self.config = (self.rdf.get("config") or {}).get("peft_export") or {}
        self.kind = self.config.get("kind", "unknown")
        onnx_entry = (self.rdf.get("weights") or {}).get("onnx")
        if not onnx_entry:
            raise DataError(f"{p} has no ONNX weights: the peft-export runtime runs ONNX packages only")
        self.weights = _check_file(self.folder, onnx_entry, "ONNX weights")
        if onnx_entry.get("external_data"):
            _check_file(self.folder, onnx_entry["external_data"], "ONNX external data")
        for att in self.rdf.get("attachments") or []:
            _check_file(self.folder, att, "attachment")
        self.input = self.rdf["inputs"][0]
        self.output = self.rdf["outputs"][0]
        self.axis_ids = [a.get("id", "batch" if a["type"] == "batch" else a["type"]) for a in self.input["axes"]]
        self.img_size = int(self.config.get("input_size") or self._space_size())
        try:
            self.session = ort_session(self.weights, providers, threads=threads)
        except Exception as exc:
            raise DataError(f"{p}: onnxruntime cannot load {self.weights.name}: {first_line(exc)}") from None
        self._input_name = self.session.get_inputs()[0].name

    def _space_size(self) -> int:
        sizes = [a.get("size") for a in self.input["axes"] if a["type"] == "space"]
        if not sizes or not all(isinstance(s, int) for s in sizes):
            raise DataError(f"{self.path}: the input's spatial size is not fixed; not a peft-export package")
        return int(max(sizes))

    def close(self) -> None:
        if self._cleanup is not None:
            self._cleanup()

    # -- tensors ----------------------------------------------------------------------------------------
    @property
    def input_dtype(self) -> str:
        data = self.input.get("data") or {}
        return str(data.get("type", "float32"))

    def preprocess(self, x: np.ndarray) -> np.ndarray:
        for step in self.input.get("preprocessing") or []:
            x = apply_step(x, step, self.axis_ids)
        return x.astype(np.dtype(self.input_dtype), copy=False)

    def run(self, x: np.ndarray, *, preprocess: bool = True) -> np.ndarray:
        """The graph's output for a tensor ``x`` in the declared input axes (e.g. the package's test input)."""
        x = self.preprocess(np.asarray(x)) if preprocess else np.asarray(x)
        return self.session.run(None, {self._input_name: np.ascontiguousarray(x)})[0]

    def tensor_from_image(self, rgb: np.ndarray) -> np.ndarray:
        """An (H, W, 3) image -> a tensor in the declared input axes (batch of one)."""
        arr = rgb[None]  # (1, H, W, C)
        src = {"batch": 0, "y": 1, "x": 2, "channel": 3}
        order = [src[a] for a in self.axis_ids if a in src]
        if len(order) != len(self.axis_ids):
            raise DataError(f"{self.path}: input axes {self.axis_ids} are not batch/channel/y/x")
        out = np.transpose(arr, order) if "batch" in self.axis_ids else np.transpose(arr[0], [o - 1 for o in order])
        return np.ascontiguousarray(out)

    # -- the export inside an encoder package -----------------------------------------------------------
    def manifest(self):
        """The export manifest attached to the package (``peft_export_manifest.json``), or None."""
        path = self.folder / MANIFEST_ATTACHMENT
        if not path.is_file():
            return None
        data = read_json_document(path, FORMAT, FORMAT_VERSION, "manifest")
        return Manifest(**{k: v for k, v in data.items() if k in Manifest.__dataclass_fields__})

    def instance_settings(self) -> dict:
        """The watershed settings of the package's declared post-processing step (the spec's custom step
        ``instance_watershed``, :mod:`peft_export.runtime.watershed_op`). The runtime runs its own copy of that step
        with these settings; it never executes code from a package. A package without that step: one line saying
        to re-package the export."""
        for step in self.output.get("postprocessing") or []:
            if isinstance(step, dict) and step.get("id") == "custom" and step.get("callable") == "instance_watershed":
                return dict(step.get("kwargs") or {})
        raise DataError(f"{self.path} carries no post-processing step (bioimage.io custom step instance_watershed): "
                        "it was made by an older peft-export; re-package its export (peft-export package EXPORT -o "
                        f"{self.path.name} --force)")


class InstancePackageBackend:
    """An instance package as a runtime backend. Its graph maps a preprocessed tile straight to the three maps, so
    to a :class:`~peft_export.runtime.segmenter.Segmenter` its ``embed`` returns those maps (B, 3, S, S) and its
    instance decoder (``instance_maps``) is the identity: automatic segmentation (strategy ``instance``) runs
    unchanged. It has no prompt decoder: ``decode`` refuses with one line."""

    name = "onnxruntime"

    def __init__(self, pkg: PackageModel, manifest):
        s = pkg.img_size
        self.package = pkg
        dims = pkg.session.get_inputs()[0].shape
        baked = bool(manifest.baked_preprocessing)
        # the package's own identity: its graph is the "encoder", its maps the "embedding" (caches stay apart)
        sha = (pkg.rdf["weights"]["onnx"] or {}).get("sha256")
        self.info = replace(manifest_info(manifest, self.name, str(pkg.path), details={
            "providers": pkg.session.get_providers(), "package": "instance",
            "instance_postprocessing": pkg.instance_settings()}),
            embedding_shape=(3, s, s), max_batch=1 if baked or not dims or dims[0] == 1 else None,
            prompt_decoder=False, instance_decoder=True, encoder_sha256=sha)

    def embed(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.uint8 if self.info.baked_preprocessing else np.float32)
        if self.info.max_batch is None or len(x) <= 1:
            return self.package.session.run(None, {self.package._input_name: x})[0]
        return np.concatenate([self.package.session.run(None, {self.package._input_name: x[i: i + 1]})[0]
                               for i in range(len(x))])

    def instance_maps(self, embedding: np.ndarray) -> np.ndarray:
        return np.asarray(embedding, np.float32)

    def decode(self, embedding, coords, labels, mask_input=None):
        raise UsageError(f"{self.package.path} is an instance-segmentation package: it has no prompt decoder (its "
                         "graph gives instance maps: automatic segmentation); for prompts, package an export "
                         "without an instance decoder")


def package_backend(path: str | os.PathLike, providers: list[str] | None = None, threads: int | None = None):
    """The runtime backend of a package made by ``peft-export package``: encoder packages -> an ONNX Runtime
    backend over the package's encoder and its attached prompt decoders; instance packages ->
    :class:`InstancePackageBackend`."""
    pkg = PackageModel(path, providers, threads=threads)
    manifest = pkg.manifest()
    if manifest is None:
        raise DataError(f"{pkg.path} carries no {MANIFEST_ATTACHMENT}: not made by peft-export package; run it with "
                        "bioimageio.core")
    if pkg.kind == "instance":
        return InstancePackageBackend(pkg, manifest)
    if "decoder_lowres" not in manifest.files:
        raise DataError(f"{pkg.path}: its export manifest lists no prompt decoder")
    verify_manifest_files(pkg.folder, manifest)
    backend = OnnxBackend(pkg.folder, manifest, providers=providers, threads=threads, source=str(pkg.path))
    backend.package = pkg  # keeps the unzipped files (removed with the PackageModel) while the backend lives
    return backend
