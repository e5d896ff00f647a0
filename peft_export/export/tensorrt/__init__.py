"""TensorRT engines from an export folder: ``encoder.engine`` + ``decoder.engine`` + ``engine.json``.

    plan = plan_engines("export_dir", EngineOptions(precision="fp16"))   # no TensorRT needed
    print(plan.trtexec_text())                                            # build by hand with trtexec
    meta = build_engines("export_dir", EngineOptions(precision="fp16"))  # TensorRT + CUDA GPU

Torch-free. TensorRT is imported lazily (see :mod:`peft_export.runtime.tensorrt_backend` for the runtime side).
Modules: ``options`` (EngineOptions, sizes), ``graph`` (what the ONNX files say: I/O, op types, Q/DQ
compatibility), ``plan`` (profiles, precision per TensorRT version, trtexec lines), ``build`` (preflight, build,
publish, engine.json), ``verify`` (the comparison with ONNX Runtime).

Precision, by feature detection (never by version string):
- the engine's precision equals the export's (``manifest.precision``): a strongly typed network
  (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; always the case on TensorRT 11): the precision is the ONNX
  graph's, fp32 islands of an fp16 export included;
- an fp16 engine from an fp32 export: TensorRT's builder flag ``BuilderFlag.FP16`` (weak typing), which exists up
  to TensorRT 10 only; TensorRT 11 needs an fp16 export (``peft-export export --precision fp16``);
- int8: only from an explicitly quantized encoder (QuantizeLinear/DequantizeLinear) whose Q/DQ nodes are
  symmetric int8 (signed, zero point 0, checked in the graph), built strongly typed on TensorRT 10 and 11 without
  precision flags; the export's decoders are float32 graphs and build in fp32. ONNX Runtime's dynamic /
  integer-operator quantization (MatMulInteger, ConvInteger, DynamicQuantizeLinear, QLinear*) is for CPUs and
  TensorRT cannot build it; implicit INT8 calibration is deprecated in TensorRT 10 and removed in 11: not offered.

The decoder engine is built from ``decoder_lowres.onnx`` (no ``orig_im_size`` shape tensor) with one optimisation
profile over the number of prompts B and the number of points N. After building, both engines run on sample
inputs and are compared with ONNX Runtime on the same ONNX files (max |diff| for fp32 engines, mask IoU for
fp16/int8); a failed gate leaves nothing behind.
"""

from __future__ import annotations

from peft_export.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    **dict.fromkeys(("Preflight", "Progress", "build_engines", "existing_outputs", "preflight"), "build"),
    **dict.fromkeys(("GraphFacts", "TensorSpec", "qdq_refusal", "read_onnx"), "graph"),
    **dict.fromkeys(("DEFAULT_MIN_IOU", "DEFAULT_TOLERANCE", "PRECISIONS", "EngineOptions", "check_range",
                     "parse_size"), "options"),
    **dict.fromkeys(("BuildPlan", "EnginePlan", "Resolved", "decoder_profile", "encoder_profile",
                     "installed_capabilities", "plan_engines", "resolve_precision", "trtexec_command"), "plan"),
    "check_parity": "verify",
})
