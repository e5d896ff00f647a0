"""The export's option families (``export``, ``merge-and-export``): format, parity gate, int8. Torch-free, so the
command line can show them without loading PyTorch or ONNX."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from peft_export.options import Options, comma_list, option

MIN_OPSET = 18  # the dynamo exporter's floor (asked for 17 it gives 18)
MAX_OPSET = 23  # what this onnx / onnxruntime support
DEFAULT_OPSET = 20  # ONNX's Gelu op: ONNX Runtime runs one fused kernel instead of Div/Erf/Add/Mul (CPU: ~1.4x)

Precision = Literal["fp32", "fp16", "int8"]


class Thresholds(Options):
    """The parity gate: how close the exported graphs must stay to the PyTorch model."""

    family = "parity gate"
    panel = "Parity gate"

    atol: float = option(1e-4, "fp32: absolute tolerance of max |diff| vs PyTorch.", ge=0)
    rtol: float = option(1e-4, "fp32: tolerance relative to the output's largest magnitude.", ge=0)
    fp16_iou: float = option(0.99, "fp16: minimum mean mask IoU vs the fp32 PyTorch model.", ge=0, le=1)
    int8_iou: float = option(0.97, "int8: minimum mean mask IoU vs fp32 on held-out images, for box prompts and "
                             "for point prompts (one per object). The most sensitive encoder nodes stay float until "
                             "it holds.", ge=0, le=1)

    def iou_for(self, precision: str) -> float | None:
        return {"fp16": self.fp16_iou, "int8": self.int8_iou}.get(precision)


class Int8Options(Options):
    """How the int8 encoder is calibrated and gated."""

    family = "int8"
    panel = "Int8"

    mode: Literal["static", "dynamic"] = option(
        "static", "static: calibrated QDQ graph (also what TensorRT builds int8 engines from); dynamic: ONNX Runtime "
        "measures activation ranges at run time (MatMuls only; CPUs only).", cli="--int8-mode")
    target: Literal["cpu", "tensorrt"] = option(
        "cpu", "cpu: uint8 activations (ONNX Runtime's CPU layout); tensorrt: symmetric int8 activations, zero point "
        "0 (TensorRT's explicit quantization; ONNX Runtime runs it too).", cli="--int8-target")
    calibration: str | None = option(
        None, "Calibration images: sample:dsb2018, or a folder (train/ + val/, images/ + labels/, or plain images; the "
        "last quarter is held out for the gate).", default_text="the checkpoint's training data when it recorded it, "
        "else sample:dsb2018")
    calibration_images: int = option(16, "Calibration inputs (the images, then their flips and rotations).", ge=1)
    gate_images: int = option(8, "Held-out gate inputs (the images, then their flips and rotations); never used for "
                              "calibration.", ge=1)
    gate_objects: int = option(16, "Prompts per kind and gate image (evenly chosen over the labelled objects).", ge=1)

    @model_validator(mode="after")
    def _dynamic_is_cpu_only(self):
        if self.mode == "dynamic" and self.target == "tensorrt":
            raise ValueError("--int8-mode dynamic runs on ONNX Runtime CPUs only; TensorRT needs --int8-mode static")
        return self


class ExportOptions(Options):
    """What an export folder holds and how it is checked."""

    family = "export"
    panel = "Export"

    precision: Precision = option(
        "fp32", "fp32, fp16 (fp32 normalisations/softmax inside) or int8 (the encoder calibrated and quantized, its "
        "most sensitive nodes kept float until the int8 gate passes; decoders fp32). See the Int8 options.",
        short="-p")
    opset: int = option(DEFAULT_OPSET, f"ONNX opset (>= {MIN_OPSET}, the dynamo exporter's floor; 20 has a native Gelu "
                        "op, which ONNX Runtime runs much faster on CPUs).", ge=MIN_OPSET, le=MAX_OPSET)
    bake_preprocessing: bool = option(False, "Encoder takes the resized image as uint8 (H', W', 3) and normalises + "
                                      "pads inside the graph.", cli="--bake-preprocessing")
    single_mask: bool = option(False, "decoder.onnx returns one mask per prompt (Meta's return_single_mask; mask 0 "
                               "for models without trained multimask outputs). decoder_lowres.onnx always returns "
                               "all four.", cli="--single-mask")
    simplify: bool = option(False, "Simplify the graphs with onnxslim (verified like the rest).", cli="--simplify")
    verify: bool = option(True, "Compare the graphs with PyTorch (the parity gate); --no-verify skips it (recorded in "
                          "the manifest as unverified).", panel="Parity gate")
    thresholds: Thresholds = Field(default_factory=Thresholds)
    int8: Int8Options = Field(default_factory=Int8Options)
    force: bool = option(False, "Replace the output folder if it exists.", cli=False)  # the commands' I/O flag


class MergeOptions(Options):
    """Folding a training checkpoint's adapters into plain weights (``merge``, ``merge-and-export``)."""

    family = "merge"
    panel = "Merge"

    source: Literal["auto", "peft-export", "micro-sam"] = option("auto", "Checkpoint kind.", cli="--from")
    model: str | None = option(None, "Model name for checkpoints that do not record it (micro-sam's).",
                               default_text="as recorded in the checkpoint")
    merge_atol: float = option(1e-4, "Absolute tolerance of the merge check (merged vs unmerged model).", ge=0)
    merge_rtol: float = option(1e-4, "Merge check tolerance relative to the output's largest magnitude.", ge=0)


# ---- the CPU gate (peft_export.export.cpu_gate) -------------------------------------------------------------

CANDIDATES = ("bf16", "bf16-mixed", "int8")


class CpuGateOptions(Options):
    """What ``peft-export cpu-gate`` gates, and how strictly."""

    family = "cpu_gate"
    panel = "CPU gate"

    precisions: comma_list(Literal[CANDIDATES], unique=True) = option(
        ["bf16", "bf16-mixed"], "Comma-separated reduced precisions to gate: bf16, bf16-mixed (one side of the "
        "encoder in f32, the rest bf16), int8 (NNCF; needs the nncf extra).", min_length=1)
    iou: float = option(0.97, "Minimum box AND point mean mask IoU vs the fp32 chain.", ge=0, le=1)
    calibration: str | None = option(
        None, "Gate (and int8 calibration) images: sample:dsb2018 or a folder.",
        default_text="the checkpoint's training data when recorded, else sample:dsb2018")
    gate_images: int = option(8, "Held-out gate inputs (images, then flips/rotations).", ge=1)
    gate_objects: int = option(16, "Prompts per kind and gate image.", ge=1)
    calibration_images: int = option(8, "int8 calibration inputs (never gate images).", ge=1)
    rounds: int = option(5, "Interleaved latency rounds per candidate.", ge=1)
