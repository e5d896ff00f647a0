"""Run a bioimage.io model package made by ``peft-export package`` — numpy + ONNX Runtime, no torch, no bioimageio.

    pkg = open_package("model.zip")        # a .zip, an unzipped package folder, or its rdf.yaml
    pkg.kind                               # "instance" (image -> instance_maps) or "encoder" (image -> embedding)
    out = pkg.run(test_input)              # the declared preprocessing + the graph, on a tensor in the declared axes
    maps = pkg.predict(image)              # any 2D image -> (3, H, W) maps at the image size / (C, h, w) embedding
    seg = pkg.segmenter()                  # a Segmenter: prompts (encoder packages), segment_instances (instance)
    labels = pkg.segment_instances(image)  # instance packages: maps + the seeded watershed

The package's own ``rdf.yaml`` drives everything: weights file and sha256, the input's axes and data type and its
preprocessing steps (implemented here in numpy: ``scale_range``, ``scale_linear``, ``fixed_zero_mean_unit_variance``,
``zero_mean_unit_variance``, ``clip``, ``ensure_dtype``), the output. Images other than S x S (the graph's fixed
input) are handled as the export runtime handles them: longest side resized to S, the preprocessing applied to
the resized image, zero padding after it, and the maps cropped and resized back like masks.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from peft_export.data.samples import sha256_file
from peft_export.errors import DataError, UsageError, first_line
from peft_export.imaging import as_rgb, resize_image, resized_shape, to_uint8_scale, upscale_masks

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


def _extract(zip_path: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="peft_export_package_"))
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for info in zf.infolist():
                name = Path(info.filename)
                if name.is_absolute() or ".." in name.parts:
                    raise DataError(f"{zip_path}: unsafe path {info.filename!r} in the package")
            zf.extractall(tmp)
    except (zipfile.BadZipFile, OSError, DataError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"cannot read package {zip_path}: {first_line(exc)}") from None
    return tmp


def _source(entry: dict, what: str) -> str:
    src = entry.get("source") if isinstance(entry, dict) else None
    if not isinstance(src, str) or "://" in src:
        raise DataError(f"the package's {what} is not a file inside the package ({src!r})")
    return src


def _check_file(folder: Path, entry: dict, what: str) -> Path:
    p = folder / _source(entry, what)
    if not p.is_file():
        raise DataError(f"the package's {what} {p.name} is missing")
    want = entry.get("sha256")
    if want and sha256_file(p) != want:
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


@dataclass
class PackageGeometry:
    """Where an image sits in the graph's S x S input: to crop and resize outputs back."""

    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    img_size: int


class PackageModel:
    """An opened package (see the module docstring). ``folder`` holds its files (a temporary copy for a .zip)."""

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None, *, threads: int | None = None):
        import yaml

        p = Path(path)
        if not p.exists():
            raise DataError(f"package not found: {p}")
        self._cleanup = None
        if p.is_file() and p.suffix.lower() == ".zip":
            self.folder = _extract(p)  # a private copy, removed with this object (or at exit)
            self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder, True)
        else:
            self.folder = p.parent if p.is_file() else p
        self.path = p
        try:
            self.rdf = yaml.safe_load(_rdf_path(self.folder).read_text())
        except yaml.YAMLError as exc:
            raise DataError(f"{p}: its rdf is not valid YAML: {first_line(exc)}") from None
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
        from peft_export.runtime.onnx_backend import ort_session

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

    # -- images -----------------------------------------------------------------------------------------
    def prepare(self, image: np.ndarray, *, name: str = "image") -> tuple[np.ndarray, PackageGeometry]:
        """A 2D image -> the graph's input (preprocessed) and its geometry. See the module docstring."""
        h, w = np.asarray(image).shape[:2]
        s = self.img_size
        if self.input_dtype == "uint8":  # preprocessing baked into the graph: uint8 on a 0-255 scale, resized
            scaled = np.clip(np.round(to_uint8_scale(image)), 0, 255)
            rh, rw = resized_shape(h, w, s)
            x = np.clip(np.round(resize_image(scaled.astype(np.float32), (rh, rw))), 0, 255).astype(np.uint8)
            return self.tensor_from_image(x), PackageGeometry((int(h), int(w)), (rh, rw), s)
        rgb = as_rgb(image, name=name)
        rh, rw = resized_shape(h, w, s)
        x = self.preprocess(self.tensor_from_image(resize_image(rgb, (rh, rw))))
        pad = [(0, 0)] * x.ndim
        pad[self.axis_ids.index("y")] = (0, s - rh)
        pad[self.axis_ids.index("x")] = (0, s - rw)
        return np.pad(x, pad), PackageGeometry((int(h), int(w)), (rh, rw), s)

    def predict(self, image: np.ndarray, *, name: str = "image") -> np.ndarray:
        """Instance packages: (3, H, W) maps at the image's size (cropped and resized like masks); encoder
        packages: the (C, h, w) image embedding."""
        x, geo = self.prepare(image, name=name)
        out = self.session.run(None, {self._input_name: np.ascontiguousarray(x)})[0][0]
        if self.kind != "instance":
            return out
        return upscale_masks(out, geo.img_size, geo.resized_hw, geo.original_hw)

    # -- the export inside an encoder package -----------------------------------------------------------
    def manifest(self):
        """The export manifest attached to the package (``peft_export_manifest.json``), or None."""
        from peft_export.manifest import FORMAT, FORMAT_VERSION, Manifest, read_json_document

        path = self.folder / MANIFEST_ATTACHMENT
        if not path.is_file():
            return None
        data = read_json_document(path, FORMAT, FORMAT_VERSION, "manifest")
        return Manifest(**{k: v for k, v in data.items() if k in Manifest.__dataclass_fields__})

    def segmenter(self, providers: list[str] | None = None, **kwargs):
        """A :class:`~peft_export.runtime.segmenter.Segmenter` on this package (see :func:`package_backend`)."""
        from peft_export.runtime.segmenter import Segmenter

        return Segmenter(backend=package_backend(self, providers), **kwargs)

    def instance_settings(self) -> dict:
        """The watershed parameters the package records (``config.peft_export.instance_postprocessing``)."""
        return dict(self.config.get("instance_postprocessing") or {})

    def postprocessing_settings(self) -> dict | None:
        """The kwargs of the package's declared post-processing step (the spec's custom step ``instance_watershed``,
        :mod:`peft_export.runtime.watershed_op`), or None when it declares none. The runtime runs its own copy of
        that step with these settings; it never executes code from a package."""
        for step in self.output.get("postprocessing") or []:
            if isinstance(step, dict) and step.get("id") == "custom" and step.get("callable") == "instance_watershed":
                return dict(step.get("kwargs") or {})
        return None

    def instance_config(self):
        """The watershed settings the package declares for its post-processing; a package without that step:
        one line saying to re-package the export."""
        from peft_export.runtime.instances import InstanceConfig

        settings = self.postprocessing_settings()
        if settings is None:
            raise DataError(f"{self.path} carries no post-processing step (bioimage.io custom step "
                            "instance_watershed): it was made by an older peft-export; re-package its export "
                            f"(peft-export package EXPORT_DIR -o {self.path.name} --force)")
        return InstanceConfig.from_dict(settings)

    def segment_instances(self, image: np.ndarray, config=None, *, name: str = "image") -> np.ndarray:
        """Instance labels (int32) of ``image`` from an instance package: :meth:`predict`'s maps, then the seeded
        watershed of :mod:`peft_export.runtime.instances` with ``config`` (default: the recorded parameters)."""
        if self.kind != "instance":
            raise UsageError(f"{self.path} is an encoder package: it computes an embedding, not instance maps")
        from peft_export.runtime.instances import maps_to_instances

        cfg = config or self.instance_config()
        return maps_to_instances(self.predict(image, name=name), cfg)


class InstancePackageBackend:
    """An instance package as a runtime backend. Its graph maps a preprocessed tile straight to the three maps, so
    to a :class:`~peft_export.runtime.segmenter.Segmenter` its ``embed`` returns those maps (B, 3, S, S) and its
    instance decoder (``instance_maps``) is the identity: ``segment_instances`` and ``predict --auto`` run
    unchanged. It has no prompt decoder: ``decode`` refuses with one line."""

    name = "onnxruntime"
    instance_decoder_available = True
    prompt_decoder = False  # automatic segmentation: the watershed (AIS) only (runtime/strategy.py)

    def __init__(self, pkg: PackageModel, manifest):
        from peft_export.manifest import Manifest

        s = pkg.img_size
        self.package = pkg
        self.out_dir = pkg.folder
        entry = {"path": pkg.weights.name, "sha256": (pkg.rdf["weights"]["onnx"] or {}).get("sha256")}
        # the package's own identity: its graph is the "encoder", its maps the "embedding" (caches stay apart)
        self.manifest = Manifest(**{**manifest.to_dict(), "files": {"encoder": entry}, "embedding": [3, s, s]})
        self.preprocess = manifest.preprocess_spec
        self.multimask = bool(manifest.multimask)
        self.baked = bool(manifest.baked_preprocessing)
        self.embedding_shape = (1, 3, s, s)
        self.mask_input_size = tuple(manifest.mask_input_size)
        dims = pkg.session.get_inputs()[0].shape
        self.max_batch = 1 if self.baked or not dims or dims[0] == 1 else None
        self.providers = pkg.session.get_providers()

    def embed(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.uint8 if self.baked else np.float32)
        if self.max_batch is None or self.baked or len(x) <= 1:
            return self.package.session.run(None, {self.package._input_name: x})[0]
        return np.concatenate([self.package.session.run(None, {self.package._input_name: x[i: i + 1]})[0]
                               for i in range(len(x))])

    def instance_maps(self, embedding: np.ndarray) -> np.ndarray:
        return np.asarray(embedding, np.float32)

    def decode(self, embedding, coords, labels, mask_input=None):
        raise UsageError(f"{self.package.path} is an instance-segmentation package: it has no prompt decoder (its "
                         "graph gives instance maps: segment_instances); for prompts, package an export without an "
                         "instance decoder")


def package_backend(package, providers: list[str] | None = None):
    """The runtime backend of a package made by ``peft-export package`` (``package``: a path or a
    :class:`PackageModel`): encoder packages -> an ONNX Runtime backend over the package's encoder and its attached
    prompt decoders; instance packages -> :class:`InstancePackageBackend`."""
    pkg = package if isinstance(package, PackageModel) else open_package(package, providers)
    manifest = pkg.manifest()
    if manifest is None:
        raise DataError(f"{pkg.path} carries no {MANIFEST_ATTACHMENT}: not made by peft-export package; run it with "
                        "open_package(...).predict or bioimageio.core")
    if pkg.kind == "instance":
        return InstancePackageBackend(pkg, manifest)
    if "decoder_lowres" not in manifest.files:
        raise DataError(f"{pkg.path}: its export manifest lists no prompt decoder")
    from peft_export.manifest import verify_manifest_files
    from peft_export.runtime.onnx_backend import OnnxBackend

    verify_manifest_files(pkg.folder, manifest)
    backend = OnnxBackend(pkg.folder, providers, manifest=manifest)
    backend.package = pkg  # keeps the unzipped files (removed with the PackageModel) while the backend lives
    return backend


def open_package(path: str | os.PathLike, providers: list[str] | None = None, *,
                 threads: int | None = None) -> PackageModel:
    if not is_package(path):
        raise UsageError(f"{path} is not a bioimage.io package (.zip, a folder with rdf.yaml, or the rdf.yaml)")
    return PackageModel(path, providers, threads=threads)
