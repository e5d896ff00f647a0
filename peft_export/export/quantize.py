"""Static, calibrated, accuracy-aware int8 of the image encoder (QDQ), the same on every x86 CPU (torch-free).

1. **Calibrate**: ONNX Runtime's static quantizer (``quantize_static``, QDQ format, MinMax ranges) runs the fp32
   encoder on the calibration images (:mod:`peft_export.export.calibration`) and records every activation range.
2. **Format**: weights int8, symmetric, per output channel, with 7-bit range (``reduce_range``: |w| <= 64) so that
   x86 kernels without VNNI cannot saturate (see :mod:`peft_export.runtime.cpu`): results do not depend on the CPU.
   Activations per tensor: uint8 asymmetric for ONNX Runtime on CPUs (``target="cpu"``), or int8 symmetric
   (zero point 0) for TensorRT's explicit quantization (``target="tensorrt"``; ONNX Runtime runs it too).
3. **Sensitivity** (:mod:`peft_export.export.sensitivity`): one pass over a few calibration images measures, for
   every MatMul/Conv, the relative error of its own output when its inputs and weights are quantized (fake
   quantization with the calibrated ranges).
4. **Mixed precision**: the most sensitive nodes stay float. A binary search finds the fewest float nodes for
   which the gate passes: int8 encoder + float decoder vs the fp32 encoder + the same decoder, on the held-out
   gate images, one box and one point prompt per object; the gate value is the smaller of the box and the point
   mean mask IoU. When only an all-float encoder passes, the export is refused with the best reachable IoU.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from peft_export.data.objects import Objects, objects_from_labels
from peft_export.errors import MissingDependencyError, PeftExportError, VerificationError, first_line
from peft_export.export.calibration import CalibrationSets, CalImage
from peft_export.export.options import Int8Options
from peft_export.export.sensitivity import OP_TYPES, WEIGHT_QMAX, node_module, node_sensitivity
from peft_export.imaging import PreprocessSpec
from peft_export.metrics import mask_ious
from peft_export.runtime.backend import mask_prompt_inputs, prepare_image
from peft_export.runtime.cpu import cpu_info
from peft_export.runtime.evaluate import predict_objects, prompts_for
from peft_export.runtime.onnx_backend import ort_session

if TYPE_CHECKING:  # onnx is imported where graphs are handled: the gate helpers here also serve the torch- and
    import onnx  # onnx-free CPU gate (peft_export.export.cpu_gate)

log = logging.getLogger(__name__)

SENSITIVITY_IMAGES = 2


@dataclass
class GateFigures:
    box_mean: float
    box_min: float
    point_mean: float
    point_min: float
    embedding_rel_error: float
    objects: int

    @property
    def value(self) -> float:
        return min(self.box_mean, self.point_mean)

    def to_dict(self) -> dict:
        return {"box_mean_iou": self.box_mean, "box_min_iou": self.box_min, "point_mean_iou": self.point_mean,
                "point_min_iou": self.point_min, "embedding_rel_error": self.embedding_rel_error,
                "objects": self.objects, "gate_value": self.value}


@dataclass
class Int8Result:
    model: onnx.ModelProto
    gate: GateFigures
    threshold: float
    record: dict = field(default_factory=dict)  # the manifest's extra["int8"]


# ---- inputs ------------------------------------------------------------------------------------------

def encoder_inputs(images: list[CalImage], spec: PreprocessSpec, baked: bool) -> list[tuple[np.ndarray, object]]:
    """(encoder feed, geometry) per image, exactly as the runtime prepares them."""
    return [prepare_image(c.image, spec, baked=baked, name=c.name) for c in images]


def gate_prompts(image: CalImage, prepared, multimask: bool, max_objects: int = 16
                 ) -> dict[str, tuple[np.ndarray, np.ndarray, bool]]:
    """Box and point prompts (model space) for a gate image: one per labelled object (at most ``max_objects``,
    evenly chosen), else a 4x4 grid."""
    if image.labels is not None:
        objects = objects_from_labels(image.labels)
    else:
        h, w = prepared.original_hw
        xs, ys = np.meshgrid((np.arange(4) + 0.5) * w / 4, (np.arange(4) + 0.5) * h / 4)
        pts = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32)
        half = np.float32(max(h, w) / 16)
        boxes = np.concatenate([np.maximum(pts - half, 0), np.minimum(pts + half, [w, h])], 1).astype(np.float32)
        objects = Objects(np.arange(1, 17), boxes, pts)
    if len(objects) > max_objects:
        keep = np.unique(np.linspace(0, len(objects) - 1, max_objects).round().astype(int))
        objects = Objects(objects.ids[keep], objects.boxes[keep], objects.points[keep])
    return {kind: prompts_for(objects, prepared, kind, multimask) for kind in ("box", "point")}


class _Chain:
    """An encoder session and the float decoder: image -> masks at the original size for the gate prompts."""

    def __init__(self, encoder, decoder, mask_size: tuple[int, int]):
        self.encoder, self.decoder, self.mask_size = encoder, decoder, mask_size
        self.enc_input = encoder.get_inputs()[0].name

    def embed(self, x: np.ndarray) -> np.ndarray:
        return self.encoder.run(None, {self.enc_input: x})[0]

    def decode(self, embedding, coords, labels, mask_input=None):
        mi, has = mask_prompt_inputs(len(coords), mask_input, self.mask_size)
        return self.decoder.run(["low_res_masks", "iou_predictions"], {
            "image_embeddings": embedding, "point_coords": coords, "point_labels": labels, "mask_input": mi,
            "has_mask_input": has})


@dataclass
class _Reference:
    feeds: list
    prompts: list
    embeddings: list
    masks: list  # per image: {kind: (N, H, W) bool}


def _masks(chain: _Chain, emb, prepared, prompts) -> dict[str, np.ndarray]:
    return {kind: predict_objects(chain, emb, prepared, c, lab, mm)[0] for kind, (c, lab, mm) in prompts.items()}


def gate_figures(chain: _Chain, ref: _Reference) -> GateFigures:
    per = {"box": [], "point": []}
    errs = []
    for (x, prepared), prompts, emb_ref, masks_ref in zip(ref.feeds, ref.prompts, ref.embeddings, ref.masks):
        emb = chain.embed(x)
        errs.append(float(np.linalg.norm(emb - emb_ref) / max(np.linalg.norm(emb_ref), 1e-12)))
        got = _masks(chain, emb, prepared, prompts)
        for kind in per:
            per[kind].append(mask_ious(got[kind], masks_ref[kind]))
    box, point = np.concatenate(per["box"]), np.concatenate(per["point"])
    return GateFigures(float(box.mean()), float(box.min()), float(point.mean()), float(point.min()),
                       float(np.mean(errs)), len(box))


# ---- ONNX Runtime's quantizer ------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet():
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # it logs "consider pre-processing" on the root logger
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over prepared encoder feeds."""

    def __init__(self, name: str, feeds: list[np.ndarray]):
        self.name, self.feeds, self.i = name, feeds, 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return {self.name: self.feeds[self.i - 1]}

    def __len__(self) -> int:
        return len(self.feeds)


def _ort_quantization():
    import inspect

    try:
        from onnxruntime import quantization as q
    except ImportError:
        raise MissingDependencyError("int8 export needs onnxruntime's quantization tools: pip install onnxruntime") \
            from None
    if "calibration_cache_path" not in inspect.signature(q.quantize_static).parameters:
        raise MissingDependencyError("int8 export needs a newer onnxruntime (quantize_static with "
                                     "calibration_cache_path): pip install -U onnxruntime")
    return q


class Quantizer:
    """``quantize_static`` on one fp32 encoder, calibrating once and reusing the ranges for every variant."""

    def __init__(self, model: onnx.ModelProto, workdir: Path, target: str, mode: str = "static"):
        import onnx

        self.q = _ort_quantization()
        self.dir = workdir
        self.src = workdir / "fp32.onnx"
        model = without_initializer_value_info(model)
        big = model.ByteSize() > 1800 * 2**20
        onnx.save_model(model, self.src, save_as_external_data=big)
        self.cache = workdir / "calibration.json"
        self.target, self.mode = target, mode
        self.input_name = model.graph.input[0].name
        self.count = 0

    def settings(self) -> dict:
        q = self.q
        sym = self.target == "tensorrt"
        return dict(quant_format=q.QuantFormat.QDQ, per_channel=True, reduce_range=True,
                    activation_type=q.QuantType.QInt8 if sym else q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                    op_types_to_quantize=list(OP_TYPES), calibrate_method=q.CalibrationMethod.MinMax,
                    # TensorRT's Q/DQ are int8 only: its biases stay float (no int32 bias DequantizeLinear)
                    extra_options={"ActivationSymmetric": sym, "WeightSymmetric": True, "QuantizeBias": not sym})

    def calibrate(self, feeds: list[np.ndarray]) -> Path:
        """Record the activation ranges (the cache every later call reuses); returns the all-int8 QDQ model."""
        return self.quantize([], feeds)

    def quantize(self, exclude: list[str], feeds: list[np.ndarray] | None = None) -> Path:
        """The int8 model with the nodes in ``exclude`` left float (``feeds``: calibrate, static QDQ)."""
        self.count += 1
        dst = self.dir / f"int8_{self.count}.onnx"
        reader = _Reader(self.input_name, feeds) if feeds is not None else None
        with _quiet():
            try:
                if self.mode == "dynamic" and feeds is None:
                    self.q.quantize_dynamic(str(self.src), str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
                                            reduce_range=True, weight_type=self.q.QuantType.QInt8,
                                            nodes_to_exclude=list(exclude))
                else:
                    self.q.quantize_static(str(self.src), str(dst), reader, nodes_to_exclude=list(exclude),
                                           calibration_cache_path=str(self.cache), **self.settings())
            except Exception as exc:  # the quantizer raises many types; one line for the user
                raise PeftExportError(f"onnxruntime int8 quantization failed: {first_line(exc)}") from exc
        return dst

    def ranges(self) -> dict[str, tuple[float, float]]:
        from onnxruntime.quantization.calibrate import load_tensors_data

        data = load_tensors_data(self.cache)
        out = {}
        for name, td in data.data.items():
            lo, hi = td.range_value if hasattr(td, "range_value") else td
            out[name] = (float(np.asarray(lo).min()), float(np.asarray(hi).max()))
        return out


def without_initializer_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """The exporter records value_info for initializers too; the quantizer rewrites some weights under the same
    name, and a stale entry then fails its shape inference: drop them."""
    import onnx

    inits = {i.name for i in model.graph.initializer}
    stale = [v for v in model.graph.value_info if v.name in inits]
    if not stale:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = [v for v in out.graph.value_info if v.name not in inits]
    del out.graph.value_info[:]
    out.graph.value_info.extend(keep)
    return out


# ---- the search --------------------------------------------------------------------------------------

def _candidates(model: onnx.ModelProto, mode: str) -> set[str]:
    """Nodes the quantizer may turn int8: MatMul/Conv (static), MatMul with constant weights (dynamic)."""
    inits = {i.name for i in model.graph.initializer}
    if mode == "dynamic":
        return {n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    return {n.name for n in model.graph.node if n.op_type in OP_TYPES}


class _Search:
    """Gate trials over 'the k most sensitive nodes stay float', binary-searched for the smallest passing k."""

    def __init__(self, quant: Quantizer, ref: _Reference, decoder, mask_size, say):
        self.quant, self.ref, self.dec, self.mask_size, self.say = quant, ref, decoder, mask_size, say
        self.session = ort_session
        self.order: list[str] = []
        self.trials: dict[int, tuple[GateFigures, Path]] = {}

    def trial(self, k: int, path: Path | None = None) -> GateFigures:
        path = path or self.quant.quantize(self.order[:k])
        figures = gate_figures(_Chain(self.session(path), self.dec, self.mask_size), self.ref)
        self.trials[k] = (figures, path)
        self.say(f"int8: {k} of {len(self.order)} node(s) float -> gate {figures.value:.4f}")
        return figures

    def smallest_passing(self, threshold: float, first: GateFigures) -> int:
        if first.value >= threshold:
            return 0
        lo, hi = 0, len(self.order)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.trial(mid).value >= threshold:
                hi = mid
            else:
                lo = mid
        return hi


def _reference(fp32: _Chain, sets: CalibrationSets, spec, baked: bool, multimask: bool,
               max_objects: int) -> _Reference:
    gate_in = encoder_inputs(sets.gate, spec, baked)
    prompts = [gate_prompts(c, prep, multimask, max_objects) for c, (_, prep) in zip(sets.gate, gate_in)]
    embs = [fp32.embed(x) for x, _ in gate_in]
    masks = [_masks(fp32, e, prep, p) for e, (_, prep), p in zip(embs, gate_in, prompts)]
    return _Reference(gate_in, prompts, embs, masks)


def quantize_encoder(encoder: onnx.ModelProto, decoder: onnx.ModelProto, spec: PreprocessSpec,
                     sets: CalibrationSets, *, threshold: float, options: Int8Options, baked: bool,
                     multimask: bool, mask_size: tuple[int, int],
                     progress: Callable[[str], None] | None = None) -> Int8Result:
    """The int8 encoder with the fewest float nodes that passes the gate; see the module docstring."""
    import onnx

    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peft-export-int8-") as tmp:
        quant = Quantizer(encoder, Path(tmp), options.target, options.mode)
        dec = ort_session(decoder)
        ref = _reference(_Chain(ort_session(quant.src), dec, mask_size), sets, spec, baked, multimask,
                         options.gate_objects)
        cal = [x for x, _ in encoder_inputs(sets.calibration, spec, baked)]
        say(f"int8: calibrating on {len(cal)} image(s)")
        full = quant.calibrate(cal)
        say("int8: per-node sensitivity")
        sens = node_sensitivity(encoder, quant.ranges(), cal[:SENSITIVITY_IMAGES], options.target == "tensorrt")
        allowed = _candidates(encoder, options.mode)
        sens = {n: e for n, e in sens.items() if n in allowed}
        search = _Search(quant, ref, dec, mask_size, say)
        search.order = sorted(sens, key=lambda n: -sens[n])
        first = search.trial(0, full if options.mode == "static" else None)
        k = search.smallest_passing(threshold, first)
        if k >= len(search.order):
            best = max(search.trials.values(), key=lambda t: t[0].value)[0]
            raise VerificationError(
                f"the int8 gate (box and point mean mask IoU vs fp32 >= {threshold:g}) cannot be met with any "
                f"encoder node in int8: the best reachable was {best.value:.4f} (box {best.box_mean:.4f}, point "
                f"{best.point_mean:.4f}); lower --int8-iou or export fp32/fp16; nothing written")
        figures, path = search.trials[k]
        model = onnx.load_model(path, load_external_data=True)
    record = _record(model, encoder, sens, search.order[:k], figures, threshold, options, sets, search.trials,
                     time.perf_counter() - t0, cpu_info())
    return Int8Result(model, figures, threshold, record)


def _record(model, encoder, sens, floats, figures, threshold, options, sets, trials, seconds, cpu) -> dict:
    by_name = {n.name: n for n in encoder.graph.node}
    rank = {n: i + 1 for i, n in enumerate(sorted(sens, key=lambda n: -sens[n]))}
    counts = {op: sum(1 for n in model.graph.node if n.op_type == op) for op in ("QuantizeLinear", "DequantizeLinear")}
    return {
        "format": "qdq" if options.mode == "static" else "dynamic", "mode": options.mode, "target": options.target,
        "quantizer": f"onnxruntime.quantization.quantize_{options.mode}",
        "weights": f"int8 symmetric per output channel, 7-bit range [-{WEIGHT_QMAX}, {WEIGHT_QMAX}] (reduce_range)",
        "activations": "uint8 asymmetric per tensor, range measured at run time" if options.mode == "dynamic"
        else "int8 symmetric per tensor (zero point 0)" if options.target == "tensorrt"
        else "uint8 asymmetric per tensor, calibrated",
        "calibration": {**sets.describe(), "method": "MinMax", "notes": sets.notes},
        "ops": ["MatMul"] if options.mode == "dynamic" else list(OP_TYPES), "graphs": ["encoder"],
        "float32_graphs": ["decoder", "decoder_lowres"],
        "candidates": len(sens), "quantized_nodes": len(sens) - len(floats), "qdq_nodes": counts,
        "float_nodes": [{"node": n, "op": by_name[n].op_type, "module": node_module(by_name[n]),
                         "sensitivity_rank": rank[n], "relative_error": round(sens[n], 5),
                         "reason": f"quantizing it alone gives a {sens[n]:.1%} output error (rank {rank[n]} of "
                                   f"{len(sens)}); kept float so that the gate passes"} for n in floats],
        "gate": {**figures.to_dict(), "threshold": threshold, "rule": "min(box, point) mean mask IoU vs the fp32 "
                 "encoder with the same float decoder, on the gate images", "images": len(sets.gate)},
        "search": [{"float_nodes": k, **t[0].to_dict()} for k, t in sorted(trials.items())],
        "cpu_at_gate": cpu, "seconds": round(seconds, 1),
    }
