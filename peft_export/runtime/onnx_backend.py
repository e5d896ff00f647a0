"""ONNX Runtime backend: runs an export folder's encoder and TensorRT-friendly decoder (torch-free)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from peft_export.errors import DataError, MissingDependencyError, UsageError, first_line
from peft_export.manifest import Manifest, read_manifest
from peft_export.runtime.backend import BackendInfo, mask_prompt_inputs, no_instance_decoder
from peft_export.runtime.cpu import cpu_info

log = logging.getLogger(__name__)

INSTANCE_ROLE = "instance_decoder"


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingDependencyError("ONNX Runtime is not installed: pip install 'peft-export[cpu]' (or "
                                     "'peft-export[gpu]' on an NVIDIA GPU machine; --backend openvino needs neither)"
                                     ) from None
    return ort


def default_providers(ort) -> list[str]:
    """CUDA first when this onnxruntime build can use it, CPU always (TensorRT EP only when asked for)."""
    available = ort.get_available_providers()
    chosen = [p for p in ("CUDAExecutionProvider",) if p in available and _cuda_usable()]
    return [*chosen, "CPUExecutionProvider"]


def _cuda_usable() -> bool:
    """onnxruntime-gpu lists CUDA even without a GPU; only offer it when a device node exists."""
    return Path("/dev/nvidia0").exists() or (os.name == "nt" and bool(os.environ.get("CUDA_PATH")))


def ort_conflict() -> str | None:
    """A warning when both ONNX Runtime builds are installed (they share one folder: whichever was installed last
    wins, and uninstalling either breaks the other)."""
    import importlib.metadata as md

    found = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            md.distribution(dist)
            found.append(dist)
        except md.PackageNotFoundError:
            pass
    if len(found) < 2:
        return None
    return ("both onnxruntime and onnxruntime-gpu are installed (they overwrite each other's files): pip uninstall -y "
            "onnxruntime onnxruntime-gpu, then pip install 'peft-export[cpu]' or 'peft-export[gpu]'")


def ort_session(model, providers: list[str] | None = None, *, threads: int | None = None, optimize: bool = True):
    """An ONNX Runtime session on ``model`` (a path, serialized bytes or an ``onnx.ModelProto``), quiet, CPU unless
    ``providers`` says otherwise. ``optimize=False`` runs the graph as written (Q/DQ pairs as float arithmetic)."""
    ort = _import_ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = model.SerializeToString() if hasattr(model, "SerializeToString") else model
    src = str(src) if isinstance(src, os.PathLike) else src
    return ort.InferenceSession(src, opts, providers=providers or ["CPUExecutionProvider"])


def warn_int8_cpu(manifest: Manifest) -> str | None:
    """For an int8 export: a warning (logged, and returned) when this CPU's int8 class differs from the one its
    gate ran on. Its weights are 7-bit, so the kernels should agree; the gate's figures were measured there."""
    int8 = (manifest.extra or {}).get("int8") if manifest.precision == "int8" else None
    gate_cpu = (int8 or {}).get("cpu_at_gate") or {}
    here = cpu_info()
    if not gate_cpu or gate_cpu.get("int8_class") == here["int8_class"]:
        return None
    msg = (f"this int8 export was gated on a {gate_cpu.get('int8_class')} CPU ({gate_cpu.get('model')}); this one is "
           f"{here['int8_class']} ({here['model']}): its gate figures were not measured here")
    log.warning(msg)
    return msg


def encoder_max_batch(shape, baked: bool) -> int | None:
    """Images per encoder call from the graph's input shape: None (any) for a symbolic batch axis; 1 for the
    static-batch encoders of exports made before the batch axis, and for baked preprocessing (one HWC image)."""
    if baked or not shape:
        return 1
    dim = shape[0]
    return None if not isinstance(dim, int) else max(1, dim)


class OnnxBackend:
    """:class:`peft_export.runtime.backend.Backend` over an export folder's ``encoder.onnx``,
    ``decoder_lowres.onnx`` and (when present) ``instance_decoder.onnx``, with ONNX Runtime."""

    name = "onnxruntime"

    @classmethod
    def unavailable(cls, folder: Path, manifest: Manifest) -> str | None:
        try:
            _import_ort()
        except MissingDependencyError as exc:
            return str(exc)
        return None

    @classmethod
    def open(cls, folder: Path, manifest: Manifest, options) -> OnnxBackend:
        conflict = ort_conflict()
        if conflict:
            log.warning(conflict)
        return cls(folder, manifest, providers=options.providers, threads=options.threads)

    def __init__(self, folder: str | os.PathLike, manifest: Manifest | None = None, *,
                 providers: list[str] | None = None, threads: int | None = None, source: str | None = None):
        ort = _import_ort()
        self.folder = Path(folder)
        m = self.manifest = manifest or read_manifest(self.folder)
        available = ort.get_available_providers()
        providers = providers or default_providers(ort)
        missing = [p for p in providers if p not in available]
        if missing:
            raise UsageError(f"onnxruntime provider {missing[0]} is not available here (available: "
                             f"{', '.join(available)})")
        self._providers, self._threads = providers, threads
        try:
            self.encoder = ort_session(m.path_of(self.folder, "encoder"), providers, threads=threads)
            self.decoder = ort_session(m.path_of(self.folder, "decoder_lowres"), providers, threads=threads)
        except Exception as exc:  # ORT raises its own exception types for broken graphs
            raise DataError(f"{self.folder}: onnxruntime cannot load the export: {first_line(exc)}") from None
        self._instance = None  # instance_decoder.onnx, loaded when first used
        in_use = self.encoder.get_providers()  # those in use, first = preferred
        enc_in = self.encoder.get_inputs()[0]
        self._enc_input = enc_in.name
        self.info = manifest_info(m, self.name, source or str(self.folder),
                                  max_batch=encoder_max_batch(enc_in.shape, bool(m.baked_preprocessing)),
                                  on_gpu=in_use[0] != "CPUExecutionProvider", details={"providers": in_use})
        warn_int8_cpu(m)

    def embed(self, x: np.ndarray) -> np.ndarray:
        """``x``: preprocessed (B, 3, S, S) float32 images (B > 1 needs an encoder exported with a batch axis;
        a static-batch encoder runs them one by one), or for a baked graph the resized uint8 image."""
        if self.info.baked_preprocessing:
            return self.encoder.run(None, {self._enc_input: np.ascontiguousarray(x, np.uint8)})[0]
        x = np.ascontiguousarray(x, np.float32)
        limit = self.info.max_batch
        if limit is None or len(x) <= limit:
            return self.encoder.run(None, {self._enc_input: x})[0]
        return np.concatenate([self.encoder.run(None, {self._enc_input: x[i: i + 1]})[0] for i in range(len(x))])

    def decode(self, embedding, coords, labels, mask_input=None):
        coords = np.ascontiguousarray(coords, np.float32)
        labels = np.ascontiguousarray(labels, np.float32)
        b = coords.shape[0]
        mask_input, has = mask_prompt_inputs(b, mask_input, self.info.mask_input_size)
        low, iou = self.decoder.run(["low_res_masks", "iou_predictions"], {
            "image_embeddings": np.ascontiguousarray(embedding, np.float32), "point_coords": coords,
            "point_labels": labels, "mask_input": mask_input, "has_mask_input": has})
        return low, iou

    def instance_maps(self, embedding: np.ndarray) -> np.ndarray:
        if not self.info.instance_decoder:
            raise no_instance_decoder(self.info)
        if self._instance is None:
            path = self.manifest.path_of(self.folder, INSTANCE_ROLE)
            self._instance = ort_session(path, self._providers, threads=self._threads)
        return self._instance.run(["instance_maps"], {
            "image_embeddings": np.ascontiguousarray(embedding, np.float32)})[0]


def manifest_info(m: Manifest, name: str, source: str, **kw) -> BackendInfo:
    """The :class:`BackendInfo` an export's manifest gives (``kw``: what the backend adds or knows better, e.g.
    ``max_batch``, an engine's ``precision``)."""
    fields = dict(
        name=name, model=m.model, source=source, preprocess=m.preprocess_spec, multimask=bool(m.multimask),
        embedding_shape=tuple(int(v) for v in m.embedding), mask_input_size=tuple(int(v) for v in m.mask_input_size),
        baked_preprocessing=bool(m.baked_preprocessing), instance_decoder=INSTANCE_ROLE in m.files,
        precision=m.precision, compute=m.precision, encoder_sha256=m.files["encoder"]["sha256"])
    return BackendInfo(**{**fields, **kw})
