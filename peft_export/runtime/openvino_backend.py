"""OpenVINO backend: runs an export folder's ONNX graphs with OpenVINO's CPU plugin (torch-free).

``openvino.Core().read_model("encoder.onnx")`` reads the export's graphs directly (no conversion, so the
manifest's sha256s still say what runs). Precision is explicit, never silent:

- OpenVINO's CPU plugin computes in **bf16 by default on CPUs with AVX512-BF16 or AMX**. Here every graph is
  compiled with ``INFERENCE_PRECISION_HINT=f32`` unless a reduced precision was asked for AND passed the export's
  CPU gate (``peft-export cpu-gate``, :mod:`peft_export.export.cpu_gate`): mask IoU vs the fp32 chain on held-out
  images, recorded in ``cpu_gate.json`` beside the export for this encoder's sha256.
- ``RuntimeOptions.inference_precision`` (``--inference-precision``): ``f32``; ``bf16`` (the whole encoder);
  ``bf16-mixed`` (the encoder split where the gate chose: the sensitive side in f32, the rest in bf16); ``int8``
  (the gate's NNCF int8 encoder, ``encoder.nncf_int8.xml``);
  ``auto``: the fastest option that passed the gate and that this CPU can run (bf16 needs AVX512-BF16 or AMX),
  else f32. What ran is read back from the compiled model (``info.compute``).
- The decoders (and the instance decoder) always run f32.
- Compiled models are cached (OpenVINO's ``CACHE_DIR``), by default under the user cache
  (``$XDG_CACHE_HOME/peft-export/openvino/<encoder sha256>``), or beside the export, or in a given folder, or not
  (``RuntimeOptions.openvino_cache``, ``--openvino-cache user|beside|off|DIR``); one sub-folder per inference
  precision (:func:`precision_cache`).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import numpy as np

from peft_export.data.samples import sha256_file
from peft_export.errors import (
    DataError,
    MissingDependencyError,
    PeftExportError,
    UsageError,
    VerificationError,
    first_line,
)
from peft_export.manifest import Manifest, read_json_document, read_manifest
from peft_export.paths import member_path, required_sha256
from peft_export.runtime.backend import mask_prompt_inputs, no_instance_decoder
from peft_export.runtime.backends import OPENVINO_PRECISIONS as PRECISIONS
from peft_export.runtime.cpu import cpu_features
from peft_export.runtime.onnx_backend import manifest_info

log = logging.getLogger(__name__)

INSTALL = "pip install 'peft-export[openvino]'"
REDUCED = ("bf16", "bf16-mixed", "int8")
CACHE_CHOICES = ("user", "beside", "off")
INSTANCE_ROLE = "instance_decoder"
GATE_FILE = "cpu_gate.json"  # written by `peft-export cpu-gate` (peft_export.export.cpu_gate)
GATE_FORMAT = "peft-export-cpu-gate"
GATE_FORMAT_VERSION = 1


def import_openvino():
    """The ``openvino`` module, or one line saying how to install it."""
    try:
        import openvino as ov
    except ImportError:
        raise MissingDependencyError(f"OpenVINO is not installed: {INSTALL}") from None
    return ov


@functools.cache
def shared_core():
    """The process's one ``openvino.Core``. Each Core's CPU plugin gives the thread that compiles an alternate
    signal stack of its own and unmaps it when that Core goes; with two Cores freed out of order the main thread
    is left pointing at unmapped memory, and the next Ctrl-C kills the process with SIGSEGV instead of stopping it
    (tests/test_openvino.py::test_ctrl_c_after_many_openvino_models_still_stops_cleanly)."""
    return import_openvino().Core()


def openvino_available() -> bool:
    """Whether openvino can be imported here (without importing it; an import hook that refuses it: no)."""
    import importlib.util

    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):
        return False


def user_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "peft-export" / "openvino"


def cache_dir_for(out_dir: Path, encoder_sha256: str, cache: str | os.PathLike | None) -> Path | None:
    """Where compiled models are cached: the user cache keyed by the encoder's sha256, beside the export, a given
    folder, or nowhere (``off`` / None)."""
    if cache is None or cache == "off":
        return None
    if cache == "user":
        return user_cache_root() / encoder_sha256[:16]
    if cache == "beside":
        return Path(out_dir) / ".openvino_cache"
    return Path(cache)


def precision_cache(cache_dir: Path, precision: str) -> Path:
    """One cache folder per inference precision. OpenVINO's cache key ignores ``INFERENCE_PRECISION_HINT``: a bf16
    compile of a graph cached at f32 loaded the f32 blob, reported bf16 and computed NaN (OpenVINO 2026.4.1, an
    Intel Xeon with AMX: LiteMedSAM's embedding all NaN, automatic segmentation 1 object instead of 24)."""
    sub = Path(cache_dir) / precision
    sub.mkdir(parents=True, exist_ok=True)
    return sub


def read_gate_record(out_dir: str | os.PathLike, manifest: Manifest) -> dict | None:
    """The export's CPU gate record, when it was made for this encoder (same sha256); else None (with a warning
    when a record for another encoder is there)."""
    path = Path(out_dir) / GATE_FILE
    if not path.is_file():
        return None
    data = read_json_document(path, GATE_FORMAT, GATE_FORMAT_VERSION, "CPU gate record")
    want = (manifest.files.get("encoder") or {}).get("sha256")
    if data.get("encoder_sha256") != want:
        log.warning("%s was made for another encoder (sha256 differs): ignored, re-run peft-export cpu-gate", path)
        return None
    return data


def check_int8_files(out_dir: Path, entry: dict) -> tuple[Path, Path]:
    """The gate's int8 encoder (OpenVINO IR: .xml + .bin): both inside the export folder and matching the sha256s
    the gate recorded (one line otherwise). Returns (xml, bin), the files to load."""
    paths = []
    for key in ("file", "weights"):
        what = "the CPU gate's int8 encoder" + (" weights" if key == "weights" else "")
        p = member_path(out_dir, entry.get(key), what)
        want = required_sha256({"sha256": entry.get(f"{key}_sha256")}, str(Path(out_dir) / GATE_FILE), what)
        if not p.is_file():
            raise DataError(f"{p} (the CPU gate's int8 encoder) is missing: re-run peft-export cpu-gate")
        if sha256_file(p) != want:
            raise VerificationError(f"{p} does not match its sha256 in {GATE_FILE}; re-run peft-export cpu-gate")
        paths.append(p)
    return paths[0], paths[1]


def bf16_capable(core) -> bool:
    """Whether OpenVINO's CPU plugin computes bf16 natively here (its own view: AVX512-BF16 or AMX)."""
    try:
        return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # an older plugin without the property: assume not
        return False


def _gated_for_instances(entry: dict, instance: bool) -> bool:
    """Whether a passed entry also gated automatic segmentation where the export has an instance decoder (records
    written before the CPU gate checked the instance labels have no ``instance_matched_iou``)."""
    return not instance or "instance_matched_iou" in entry


def choose_precision(requested: str, record, bf16_ok: bool, instance: bool = False) -> tuple[str, str]:
    """(precision to run, why) from the request, the export's CPU gate record and the CPU.

    Reduced precisions run only when the gate passed them for this encoder (``instance``: the export has an
    instance decoder, so the gate must have checked its labels too); ``auto`` takes the fastest passed option this
    CPU can run (by the gate's measured latency), else f32. An explicit request that cannot be honoured is an error
    (never a silent fallback)."""
    if requested not in PRECISIONS:
        raise UsageError(f"unknown OpenVINO precision {requested!r}; choose from {', '.join(PRECISIONS)}")
    if requested == "f32":
        return "f32", "asked for"
    gated = (record or {}).get("precisions") or {}
    runnable = {}
    for name, entry in gated.items():
        if name in REDUCED and entry.get("passed") and (bf16_ok or not name.startswith("bf16")) and \
                _gated_for_instances(entry, instance):
            runnable[name] = entry
    if requested == "auto":
        if not runnable:
            passed = [e for e in gated.values() if e.get("passed")]
            why = ("no CPU gate record (peft-export cpu-gate)" if not record else
                   "no reduced precision passed the CPU gate" if not passed else
                   "the CPU gate record predates its check of automatic segmentation: re-run peft-export cpu-gate"
                   if not any(_gated_for_instances(e, instance) for e in passed) else
                   "this CPU has no bf16 arithmetic and only bf16 passed the gate")
            return "f32", why
        best = min(runnable, key=lambda n: runnable[n].get("latency_ratio", 1.0))
        return best, f"fastest option that passed the CPU gate (x{runnable[best].get('latency_ratio', 1):.2f} of f32)"
    flag = f"--inference-precision {requested}"
    if requested.startswith("bf16") and not bf16_ok:
        raise UsageError(f"{flag}: this CPU has no bf16 arithmetic (AVX512-BF16 or AMX); use f32 (or int8 where it "
                         "passed the CPU gate)")
    entry = gated.get(requested)
    if entry is None:
        raise UsageError(f"{flag} has not been gated for this export: run `peft-export cpu-gate EXPORT "
                         f"--precisions {requested}` first (mask IoU vs fp32 on held-out images)")
    if not entry.get("passed"):
        raise UsageError(f"{flag} failed this export's CPU gate (box {entry.get('box_mean_iou', 0):.4f}, point "
                         f"{entry.get('point_mean_iou', 0):.4f}, threshold {record.get('threshold')}): use f32 or auto")
    if not _gated_for_instances(entry, instance):
        raise UsageError(f"{flag} was gated before the CPU gate checked automatic segmentation (this export has an "
                         f"instance decoder): re-run `peft-export cpu-gate EXPORT --precisions {requested}`")
    return requested, "asked for, passed the CPU gate"


class OpenVinoBackend:
    """:class:`peft_export.runtime.backend.Backend` with OpenVINO over an export folder's ONNX graphs.

    ``info.compute`` is the encoder's inference precision read back from OpenVINO (f32, bf16, a bf16-mixed split
    ``bf16+f32``, or ``int8+f32``); ``info.details`` holds the OpenVINO version, the precision asked for, the one
    chosen and why, the compiled-model cache folder, and this CPU (model, kind, flags)."""

    name = "openvino"

    @classmethod
    def unavailable(cls, folder: Path, manifest: Manifest) -> str | None:
        if not openvino_available():
            return f"OpenVINO is not installed: {INSTALL}"
        return None

    @classmethod
    def open(cls, folder: Path, manifest: Manifest, options) -> OpenVinoBackend:
        return cls(folder, options.inference_precision, manifest=manifest, cache=options.openvino_cache,
                   threads=options.threads)

    def __init__(self, out_dir: str | os.PathLike, precision: str = "auto", *, manifest: Manifest | None = None,
                 cache: str | os.PathLike | None = "user", threads: int | None = None,
                 hint: str = "LATENCY", gate_record: dict | None = None):
        ov = import_openvino()
        self.out_dir = Path(out_dir)
        self.manifest = m = manifest or read_manifest(self.out_dir)
        self.baked = bool(m.baked_preprocessing)
        enc_sha = m.files["encoder"]["sha256"] if "encoder" in m.files else ""
        self.core = core = shared_core()
        cache_dir = cache_dir_for(self.out_dir, enc_sha, cache)
        if cache_dir is not None:
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a read-only export folder or home: run uncached, say so once
                log.warning("OpenVINO model cache %s is not writable (%s): compiling without a cache",
                            cache_dir, first_line(exc))
                cache_dir = None
        self.record = gate_record if gate_record is not None else read_gate_record(self.out_dir, m)
        bf16_ok = bf16_capable(core)
        self.precision_run, why = choose_precision(precision, self.record, bf16_ok, INSTANCE_ROLE in m.files)
        self._config = {"PERFORMANCE_HINT": hint}
        self._cache_dir = cache_dir  # per compile, not on the shared Core: each export keeps its own cache
        if threads:
            self._config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self._encoders, compute = self._compile_encoder(m)
            self.decoder = self._compile(m.path_of(self.out_dir, "decoder_lowres"), "f32")
        except PeftExportError:  # one line already (a bad export or gate record)
            raise
        except Exception as exc:  # OpenVINO raises RuntimeError with multi-line messages for broken graphs
            raise DataError(f"{self.out_dir}: OpenVINO cannot load the export: {first_line(exc)}") from None
        self._instance = None
        features = cpu_features()
        # compiled with a static batch of 1 (faster on CPUs): more images are one encoder call each
        self.info = manifest_info(
            m, self.name, str(self.out_dir), max_batch=1, on_gpu=False, compute=compute,
            details={"openvino": ov.__version__, "requested": precision, "ran": self.precision_run, "why": why,
                     "cache_dir": str(cache_dir) if cache_dir else None, "bf16_capable": bf16_ok,
                     "cpu": {k: features[k] for k in ("model", "kind", "flags")}})

    # ---- compiling -----------------------------------------------------------------------------------

    def _compile(self, model, precision: str, *, batch1: bool = False):
        """Compile a graph (path or ov.Model) with an explicit inference precision (f32 | bf16)."""
        core = self.core
        ov_model = core.read_model(str(model)) if isinstance(model, (str, os.PathLike)) else model
        if batch1:
            ov_model = _static_batch(ov_model)
        config = {**self._config, "INFERENCE_PRECISION_HINT": precision}
        if self._cache_dir is not None:
            try:
                config["CACHE_DIR"] = str(precision_cache(self._cache_dir, precision))
            except OSError as exc:
                log.warning("OpenVINO model cache %s is not writable (%s): compiling without a cache",
                            self._cache_dir, first_line(exc))
        return core.compile_model(ov_model, "CPU", config)

    def _compile_encoder(self, m: Manifest):
        """The encoder as one or two compiled models (bf16-mixed: trunk then tail); the compute precision read
        back from the compiled model(s)."""
        path = m.path_of(self.out_dir, "encoder")
        run = self.precision_run
        if run == "int8":
            entry = self.record["precisions"]["int8"]
            xml, weights = check_int8_files(self.out_dir, entry)  # the verified .bin, not the one beside the .xml
            compiled = [self._compile(self.core.read_model(str(xml), str(weights)), "f32", batch1=True)]
        elif run == "bf16-mixed":
            split = self.record["precisions"]["bf16-mixed"]["split"]
            head, tail = split_model(_folded(self.core.read_model(str(path)), self.baked), split["tensor"])
            first, second = ("f32", "bf16") if split.get("f32") == "head" else ("bf16", "f32")
            compiled = [self._compile(head, first, batch1=True), self._compile(tail, second, batch1=not self.baked)]
        else:
            compiled = [self._compile(path, "bf16" if run == "bf16" else "f32", batch1=not self.baked)]
        ran = [_read_precision(c) for c in compiled]
        compute = ran[0] if len(set(ran)) == 1 else "+".join(ran)
        if run == "int8":
            compute = f"int8+{compute}"
        return compiled, compute

    # ---- the Backend protocol ------------------------------------------------------------------------

    def embed(self, x: np.ndarray) -> np.ndarray:
        """``x``: preprocessed (B, 3, S, S) float32 images (one encoder call each), or for a baked graph the resized
        uint8 image."""
        if self.baked:
            return self._run_encoder(np.ascontiguousarray(x, np.uint8))
        x = np.ascontiguousarray(x, np.float32)
        if len(x) == 1:
            return self._run_encoder(x)
        return np.concatenate([self._run_encoder(x[i: i + 1]) for i in range(len(x))])

    def _run_encoder(self, x: np.ndarray) -> np.ndarray:
        out = x
        for compiled in self._encoders:
            out = compiled(out)[0]
        return np.asarray(out, np.float32)

    def decode(self, embedding, coords, labels, mask_input=None):
        coords = np.ascontiguousarray(coords, np.float32)
        labels = np.ascontiguousarray(labels, np.float32)
        b = coords.shape[0]
        mask_input, has = mask_prompt_inputs(b, mask_input, self.info.mask_input_size)
        res = self.decoder({"image_embeddings": np.ascontiguousarray(embedding, np.float32), "point_coords": coords,
                            "point_labels": labels, "mask_input": mask_input, "has_mask_input": has})
        return np.asarray(res["low_res_masks"]), np.asarray(res["iou_predictions"])

    def instance_maps(self, embedding: np.ndarray) -> np.ndarray:
        """(B, C, h, w) -> (B, 3, S, S) sigmoid maps of the export's instance decoder (f32)."""
        if not self.info.instance_decoder:
            raise no_instance_decoder(self.info)
        if self._instance is None:
            self._instance = self._compile(self.manifest.path_of(self.out_dir, INSTANCE_ROLE), "f32")
        return np.asarray(self._instance(np.ascontiguousarray(embedding, np.float32))["instance_maps"], np.float32)


def _read_precision(compiled) -> str:
    """What the compiled model computes in (f32 | bf16 | f16), read back from OpenVINO."""
    value = compiled.get_property("INFERENCE_PRECISION_HINT")
    return value.to_string() if hasattr(value, "to_string") else str(value)


def _folded(model, baked: bool):
    """The batch fixed to 1 and shape sub-graphs constant-folded, as the CPU gate cut it (cut points are found on
    this form)."""
    from openvino.passes import ConstantFolding, Manager

    if not baked:
        _static_batch(model)
    mgr = Manager()
    mgr.register_pass(ConstantFolding())
    mgr.run_passes(model)
    return model


def _static_batch(model):
    """Fix a symbolic batch axis (the first) to 1: OpenVINO runs static shapes ~5% faster on CPUs."""
    p = model.input(0)
    shape = p.get_partial_shape()
    if shape.rank.is_static and shape.rank.get_length() >= 2 and shape[0].is_dynamic:
        dims = [1] + [d.get_length() if d.is_static else -1 for d in list(shape)[1:]]
        model.reshape({p.any_name: dims})
    return model


def split_model(model, tensor: str):
    """Cut an encoder ``ov.Model`` at the tensor named ``tensor`` into (head: inputs -> tensor, tail: tensor ->
    outputs). The tensor must be the only value crossing the cut (a residual stream between blocks, the neck's
    input): a tail that still needs other head values is refused."""
    import openvino as ov

    ops = {}
    for op in model.get_ordered_ops():
        for out in op.outputs():
            for name in out.get_names():
                ops[name] = out
    if tensor not in ops:
        raise DataError(f"the encoder has no tensor {tensor!r} to split at (re-run peft-export cpu-gate)")
    cut = ops[tensor]
    head = ov.Model([cut], [p for p in model.get_parameters()], "encoder_head")
    param = ov.opset13.parameter(cut.get_partial_shape(), cut.get_element_type(), name="encoder_cut")
    param.output(0).set_names({"encoder_cut"})
    for target in list(cut.get_target_inputs()):
        if target.get_node().get_type_name() != "Result":
            target.replace_source_output(param.output(0))
    tail = ov.Model([r for r in model.get_results()], [param], "encoder_tail")
    for node in tail.get_ordered_ops():  # nothing of the head may remain upstream of the tail
        if node.get_type_name() == "Parameter" and node.get_friendly_name() != "encoder_cut":
            raise DataError(f"splitting the encoder at {tensor!r} leaves other values crossing the cut")
    return head, tail
