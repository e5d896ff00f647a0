"""NNCF post-training int8 of the encoder for OpenVINO, held to the CPU gate (torch-free; needs the nncf extra).

``nncf.quantize`` on the fp32 encoder read by OpenVINO: transformer model type, SmoothQuant OFF (on LiteMedSAM the
transformer preset's SmoothQuant made results worse), calibration on images the gate never sees. Quantizing every
MatMul/Conv fails the gate on LiteMedSAM, so the MatMul/Conv nodes are ranked once by their own int8 error
(:mod:`peft_export.export.sensitivity`: one ONNX Runtime pass with fake-quantized inputs and weights, the same
ranking the ONNX Runtime int8 export uses) and a binary search finds the fewest float nodes (NNCF ``ignored_scope``
by OpenVINO friendly names, which are the ONNX node names) for which the gate passes. The result is saved as
OpenVINO IR (``encoder.nncf_int8.xml`` + ``.bin``, weights not compressed to fp16) beside the export, with its
sha256s in ``cpu_gate.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from peft_export.data.samples import sha256_file
from peft_export.errors import MissingDependencyError, PeftExportError, first_line
from peft_export.export.quantize import encoder_inputs
from peft_export.export.sensitivity import OP_TYPES, node_sensitivity
from peft_export.runtime.onnx_backend import ort_session

log = logging.getLogger(__name__)

INT8_FILE = "encoder.nncf_int8.xml"
SENSITIVITY_IMAGES = 2
INSTALL = "pip install 'peft-export[nncf]'"


def import_nncf():
    try:
        import nncf
    except ImportError:
        raise MissingDependencyError(f"int8 for OpenVINO needs NNCF: {INSTALL}") from None
    return nncf


def activation_ranges(onnx_path: Path, feeds: list[np.ndarray]) -> tuple[dict[str, tuple[float, float]], object]:
    """Min/max of every non-constant MatMul/Conv input over ``feeds`` (fp32, ONNX Runtime), and the graph."""
    import onnx

    model = onnx.load_model(str(onnx_path))
    inits = {i.name for i in model.graph.initializer}
    wanted = sorted({x for n in model.graph.node if n.op_type in OP_TYPES for x in n.input[:1] if x and x not in inits})
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=x) for x in wanted if x not in have)
    sess = ort_session(model)
    names = [o.name for o in sess.get_outputs()]
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    for x in feeds:
        for name, v in zip(names, sess.run(None, {model.graph.input[0].name: x})):
            if name in wanted:
                lo[name] = min(lo.get(name, np.inf), float(np.min(v)))
                hi[name] = max(hi.get(name, -np.inf), float(np.max(v)))
    return {k: (lo[k], hi[k]) for k in lo}, onnx.load_model(str(onnx_path))


def sensitivity_order(onnx_path: Path, feeds: list[np.ndarray]) -> tuple[list[str], dict[str, float]]:
    """MatMul/Conv node names, most sensitive to int8 first, and each one's relative output error."""
    ranges, model = activation_ranges(onnx_path, feeds)
    sens = node_sensitivity(model, ranges, feeds, symmetric=False)
    return sorted(sens, key=lambda n: -sens[n]), sens


def quantize(nncf, model, feeds: list[np.ndarray], ignored: list[str], friendly: set[str]):
    """NNCF int8 of an ``ov.Model`` with the named nodes left float."""
    names = [n for node in ignored for n in (node, f"{node}/WithoutBiases") if n in friendly]
    params = nncf.AdvancedQuantizationParameters(
        smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(convolution=-1, matmul=-1))
    try:
        return nncf.quantize(model, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER,
                             subset_size=len(feeds), ignored_scope=nncf.IgnoredScope(names=names, validate=False),
                             advanced_parameters=params)
    except Exception as exc:  # NNCF raises many types; one line for the user
        raise PeftExportError(f"NNCF quantization failed: {first_line(exc)}") from exc


def gate_int8(ctx, options) -> dict:
    """The NNCF int8 encoder with the fewest float MatMul/Conv that passes the gate (see the module docstring);
    saved beside the export when it passes. Returns the gate record's entry."""
    import openvino as ov

    nncf = import_nncf()
    logging.getLogger("nncf").setLevel(logging.ERROR)
    m = ctx.manifest
    feeds = [x for x, _ in encoder_inputs(ctx.sets.calibration, m.preprocess_spec, bool(m.baked_preprocessing))]
    onnx_path = m.path_of(ctx.out_dir, "encoder")
    ctx.say(f"int8 (NNCF): per-node sensitivity on {min(SENSITIVITY_IMAGES, len(feeds))} calibration input(s)")
    order, sens = sensitivity_order(onnx_path, feeds[:SENSITIVITY_IMAGES])
    friendly = {op.get_friendly_name() for op in ctx.encoder_model().get_ops()}
    trials: dict[int, tuple] = {}

    def trial(k: int):
        qm = quantize(nncf, ctx.encoder_model(), feeds, order[:k], friendly)
        compiled = [ctx.compile(qm, "f32")]
        fig = ctx.figures(compiled)
        trials[k] = (fig, qm, compiled)
        ctx.say(f"int8 (NNCF): {k} of {len(order)} MatMul/Conv float -> gate {fig.value:.4f}")
        return fig

    lo, hi = -1, len(order)  # lo: fails, hi: passes (all float)
    if trial(0).value >= ctx.threshold:
        hi = 0
    else:
        lo = 0
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if trial(mid).value >= ctx.threshold:
                hi = mid
            else:
                lo = mid
    search = [{"float_nodes": k, **trials[k][0].to_dict()} for k in sorted(trials)]
    common = {"quantizer": f"nncf {nncf.__version__} (OpenVINO backend), model_type=TRANSFORMER, SmoothQuant off",
              "calibration_images": [c.name for c in ctx.sets.calibration], "candidates": len(order), "search": search}
    if hi >= len(order):
        best = max(t[0].value for t in trials.values())
        return {"passed": False, "reason": f"no int8 variant passes (best gate value {best:.4f})", **common}
    fig, qm, compiled = trials[hi]
    xml = ctx.out_dir / INT8_FILE
    ov.save_model(qm, str(xml), compress_to_fp16=False)
    weights = xml.with_suffix(".bin")
    return {**ctx.entry(fig), **common, "file": xml.name, "file_sha256": sha256_file(xml),
            "weights": weights.name, "weights_sha256": sha256_file(weights), "quantized_nodes": len(order) - hi,
            "float_nodes": [{"node": n, "relative_error": round(sens[n], 5)} for n in order[:hi]],
            "_compiled": compiled}
