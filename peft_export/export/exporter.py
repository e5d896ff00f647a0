"""Export a SAM model to an ONNX folder (encoder + two decoders + manifest), gated by parity with PyTorch.

    from peft_export.export import ExportOptions, export_model, prepare_for_export
    prepared = prepare_for_export(load_model("run/best.pt"))        # merges PEFT adapters (verified)
    result = export_model(prepared, "export_dir", ExportOptions(precision="fp16"))

The folder is built in a temporary sibling and renamed into place only when everything (export, conversion,
parity gate, manifest) succeeded, so a failure never leaves a partial ``OUT_DIR`` (:func:`peft_export.files.atomic_dir`:
a crash leaves a recognisable temporary folder that the next export beside it removes; the previous OUT_DIR stays
until the new one is complete). An OUT_DIR that is or holds the checkpoint is refused, even with ``force``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import onnx

from peft_export.data.samples import sha256_file
from peft_export.errors import UsageError, VerificationError
from peft_export.export import graphs, instance, onnx_export, precision
from peft_export.export.calibration import calibration_sets
from peft_export.export.options import ExportOptions
from peft_export.export.parity import ParityReport, run_parity
from peft_export.export.quantize import quantize_encoder
from peft_export.files import atomic_dir
from peft_export.manifest import Manifest, file_entry, write_manifest
from peft_export.models.checkpoint import versions
from peft_export.paths import refuse_inputs
from peft_export.peft import is_mergeable, peft_state
from peft_export.peft.merge import merge_and_verify

EXTERNAL_DATA_BYTES = 1800 * 2**20  # graphs whose weights exceed this are saved with a .data side file (2 GB limit)
ROLES = {"encoder": "encoder.onnx", "decoder": "decoder.onnx", "decoder_lowres": "decoder_lowres.onnx",
         "instance_decoder": "instance_decoder.onnx"}  # the last only for models with one (export/instance.py)


@dataclass
class PreparedModel:
    """A model ready to export (PEFT merged where possible) and where it came from."""

    model: Any  # segment_anything Sam, eval, fp32
    spec: Any  # ModelSpec
    source: dict
    merge_report: Any = None
    instance_decoder: Any = None  # models.instance_decoder.InstanceDecoder, exported as instance_decoder.onnx


@dataclass
class ExportResult:
    out_dir: Path
    manifest: Manifest
    report: ParityReport | None
    seconds: dict[str, float]

    def to_dict(self) -> dict:
        return {"out_dir": str(self.out_dir), "model": self.manifest.model, "precision": self.manifest.precision,
                "verified": self.manifest.verified, "passed": self.report.passed if self.report else None,
                "parity": self.manifest.parity, "files": self.manifest.files, "source": self.manifest.source,
                "seconds": self.seconds}


def prepare_for_export(loaded, *, merge_atol: float = 1e-4, merge_rtol: float = 1e-4) -> PreparedModel:
    """Merge a loaded model's PEFT adapters (verified); AdaptFormer keeps its adapter modules."""
    model = loaded.model.eval().float()
    state = peft_state(model)
    ckpt = loaded.checkpoint
    source = {"checkpoint": str(Path(ckpt.path).resolve()) if ckpt is not None and ckpt.path else None,
              "checkpoint_sha256": sha256_file(ckpt.path) if ckpt is not None and ckpt.path else None,
              "kind": ckpt.kind if ckpt is not None else "zoo", "peft": state.config.to_dict() if state else
              (loaded.peft if ckpt is not None and ckpt.merged else None),
              "merged": bool(ckpt is not None and ckpt.merged)}
    if ckpt is not None and isinstance(ckpt.raw.get("data"), dict):
        source["training_data"] = ckpt.raw["data"]  # int8 calibrates on it when it is readable here
    report = None
    if state is not None and is_mergeable(model):
        model, report = merge_and_verify(model, loaded.spec.preprocess, atol=merge_atol, rtol=merge_rtol)
        source["merged"] = True
        source["merge_check"] = report.to_dict()
    elif state is not None:
        source["merged"] = False
        source["note"] = f"{state.config.method} is not mergeable: exported with its adapter modules"
    decoder = getattr(loaded, "instance_decoder", None)
    source["instance_decoder"] = decoder is not None
    return PreparedModel(model.eval(), loaded.spec, source, report, decoder.eval() if decoder is not None else None)


def _save(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Save a graph; with a .data side file when its weights would exceed the 2 GB protobuf limit."""
    weight_bytes = sum(len(i.raw_data) for i in model.graph.initializer)
    if weight_bytes > EXTERNAL_DATA_BYTES:
        data = path.with_name(path.name + ".data")
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
                        size_threshold=1024)
        return [path, data]
    onnx.save_model(model, path)
    return [path]


def _opset_of(model: onnx.ModelProto) -> int:
    return max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))


def check_out_dir(out_dir: Path, force: bool, inputs=()) -> None:
    """Refuse an existing OUT_DIR (file, or non-empty folder) without --force, and, even with --force, an OUT_DIR
    that is or holds one of ``inputs`` (the checkpoint, its run folder, calibration data): it is replaced whole."""
    refuse_inputs([out_dir], inputs, replaces=True)
    if out_dir.exists() and not force and (out_dir.is_file() or any(out_dir.iterdir())):
        raise UsageError(f"output {out_dir} already exists; pass --force to overwrite it")


def export_inputs(prepared: PreparedModel | None = None, options: ExportOptions | None = None) -> list[str]:
    """What an export reads from disk and must never replace: the checkpoint (and so its run folder), the
    calibration images."""
    paths = []
    if prepared is not None and prepared.source.get("checkpoint"):
        paths.append(prepared.source["checkpoint"])
    if options is not None and options.int8.calibration and not str(options.int8.calibration).startswith("sample:"):
        paths.append(options.int8.calibration)
    return paths


def export_steps(options: ExportOptions) -> int:
    """How many progress steps :func:`export_model` reports (messages with ``advance=False`` are extra)."""
    return 4 + (options.precision != "fp32") + bool(options.simplify) + (4 if options.verify else 0)


@dataclass
class _Built:
    """The graphs of an export before they are written, and what the manifest records about their making."""

    models: dict[str, onnx.ModelProto]
    reused: dict[str, bool]
    int8: Any = None  # quantize.Int8Result
    fp32_encoder: onnx.ModelProto | None = None  # what int8 quantized


def _build(prepared: PreparedModel, options: ExportOptions, say, timed) -> _Built:
    """Trace, optimise, convert (fp16 / int8), add baked preprocessing and Meta's decoder, simplify."""
    sam, spec = prepared.model.eval(), prepared.spec
    sets = _calibration(prepared, options, say) if options.precision == "int8" else None  # bad data fails first
    say("tracing the image encoder (torch.onnx, dynamo)")
    enc = timed("trace_encoder", lambda: onnx_export.trace_encoder(sam, options.opset))
    say("tracing the prompt decoder")
    dec = timed("trace_decoder", lambda: onnx_export.trace_decoder_lowres(sam, options.opset))
    built = _Built({}, {"encoder": enc.reused, "decoder": dec.reused})
    say("optimising the graphs")
    enc_m = timed("optimize_encoder", lambda: onnx_export.optimize(enc.model))
    dec_m = timed("optimize_decoder", lambda: onnx_export.optimize(dec.model))
    if options.precision == "fp16":
        say("converting to fp16 (normalisations and softmax kept in fp32)")
        enc_m = timed("fp16_encoder", lambda: precision.to_fp16(enc_m))
        dec_m = timed("fp16_decoder", lambda: precision.to_fp16(dec_m))
    elif options.precision == "int8":
        say(f"int8 ({options.int8.mode}): calibration, sensitivity, gate search")
        built.int8 = timed("int8_encoder", lambda: _quantize(prepared, sets, enc_m, dec_m, options,
                                                             lambda msg: say(msg, advance=False)))
        built.fp32_encoder, enc_m = enc_m, built.int8.model
    if options.bake_preprocessing:
        enc_m = graphs.bake_preprocessing(enc_m, spec.preprocess)
        if built.fp32_encoder is not None:
            built.fp32_encoder = graphs.bake_preprocessing(built.fp32_encoder, spec.preprocess)
    meta_m = graphs.attach_meta_postprocessing(dec_m, spec.img_size, single_mask=options.single_mask,
                                               multimask=spec.multimask)
    built.models = {"encoder": enc_m, "decoder": meta_m, "decoder_lowres": dec_m}
    inst = instance.build(prepared, options, say, timed)
    if inst is not None:
        built.models[instance.ROLE], built.reused[instance.ROLE] = inst.model, inst.reused
    if options.simplify:
        say("simplifying (onnxslim)")
        built.models = {k: timed(f"simplify_{k}", lambda m=m: precision.simplify(m)) for k, m in built.models.items()}
    return built


def _verify(prepared: PreparedModel, built: _Built, tmp: Path, options: ExportOptions, say) -> ParityReport:
    """The parity gate on the written graphs; raises ExportParityError (nothing is written) when it fails."""
    source_encoder = None
    if built.int8 is not None:  # the fp32 graph that was quantized: checked against PyTorch, then removed
        source_encoder = tmp / ".fp32_encoder.onnx"
        _save(built.fp32_encoder, source_encoder)
    try:
        report = run_parity(prepared.model.eval(), prepared.spec.preprocess, tmp, precision=options.precision,
                            baked=options.bake_preprocessing, single_mask=options.single_mask,
                            multimask=prepared.spec.multimask, thresholds=options.thresholds, progress=say,
                            int8=built.int8.record["gate"] if built.int8 is not None else None,
                            source_encoder=source_encoder)
    finally:
        for leftover in tmp.glob(".fp32_encoder.onnx*"):
            leftover.unlink()
    report.checks += instance.parity_checks(prepared, tmp, precision_name=options.precision,
                                            baked=options.bake_preprocessing, thresholds=options.thresholds,
                                            fig=report.figures, int8_threshold=built.int8.record["gate"]["threshold"]
                                            if built.int8 is not None else None)
    if not report.passed:
        bad = report.failures()[0]
        op = "<=" if bad.kind == "max" else ">="
        raise ExportParityError(f"export parity check failed: {bad.name} = {bad.value:.3g} (must be {op} "
                                f"{bad.limit:.3g}); nothing written", report)
    return report


def _manifest(prepared: PreparedModel, built: _Built, written: dict[str, list[Path]], report, options: ExportOptions,
              seconds: dict) -> Manifest:
    sam, spec = prepared.model, prepared.spec
    files = {}
    for role, paths in written.items():
        ins, outs = graphs.describe_io(built.models[role])
        files[role] = file_entry(paths[0], inputs=ins, outputs=outs)
        if len(paths) > 1:
            files[f"{role}_data"] = file_entry(paths[1])
    c = int(sam.prompt_encoder.embed_dim)
    h, w = (int(v) for v in sam.prompt_encoder.image_embedding_size)
    return Manifest(
        model=spec.name, preprocess=spec.preprocess.to_dict(), embedding=[c, h, w], mask_input_size=[4 * h, 4 * w],
        multimask=bool(spec.multimask), precision=options.precision, opset=_opset_of(built.models["encoder"]),
        files=files, baked_preprocessing=bool(options.bake_preprocessing), source=prepared.source,
        parity=report.to_dict() if report else {"verified": False, "reason": "exported with --no-verify"},
        verified=report is not None, versions={**versions(), **onnx_export.torch_versions()},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        extra={
            "exporter": "torch.onnx.export(dynamo=True), onnxscript optimizer",
            "decoder": {"single_mask": bool(options.single_mask),
                        "single_mask_rule": ("meta" if spec.multimask else "mask 0") if options.single_mask else None},
            "simplified": bool(options.simplify),
            "reused_trace": built.reused,
            "fp32_ops_in_fp16": list(precision.FP16_FP32_OPS) if options.precision == "fp16" else None,
            "int8": built.int8.record if built.int8 is not None else None,
            "instance_decoder": instance.manifest_entry(prepared),
            "seconds": seconds,
        },
    )


def export_model(prepared: PreparedModel, out_dir: str | os.PathLike, options: ExportOptions | None = None, *,
                 progress: Callable[..., None] | None = None) -> ExportResult:
    """Trace, convert, compose, save, verify and write the manifest; see the module docstring.

    ``progress(message, advance=True)`` is called for each of :func:`export_steps` steps (and with
    ``advance=False`` for details within a step)."""
    options = options or ExportOptions()
    out_dir = Path(out_dir)
    say = progress or (lambda msg, advance=True: None)
    seconds: dict[str, float] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        seconds[name] = round(time.perf_counter() - t0, 3)
        return out

    check_out_dir(out_dir, options.force, export_inputs(prepared, options))
    built = _build(prepared, options, say, timed)
    with atomic_dir(out_dir) as tmp:  # built beside OUT_DIR, swapped in when complete (peft_export/files.py)
        say("writing the graphs")
        written = {role: timed(f"save_{role}", lambda r=role, m=model: _save(m, tmp / ROLES[r]))
                   for role, model in built.models.items()}
        report = timed("parity", lambda: _verify(prepared, built, tmp, options, say)) if options.verify else None
        manifest = _manifest(prepared, built, written, report, options, seconds)
        write_manifest(tmp, manifest)
    return ExportResult(out_dir, manifest, report, seconds)


def _calibration(prepared: PreparedModel, options: ExportOptions, say):
    """int8's calibration and gate images: the checkpoint's training data, else --calibration."""
    o = options.int8
    sets = calibration_sets(o.calibration, training_data=prepared.source.get("training_data"),
                            calibration_images=o.calibration_images, gate_images=o.gate_images)
    for note in sets.notes:
        say(note, advance=False)
    return sets


def _quantize(prepared: PreparedModel, sets, enc_m, dec_m, options: ExportOptions, say):
    """The int8 encoder: the accuracy-aware search of :mod:`peft_export.export.quantize`, gated at --int8-iou."""
    o = options.int8
    h, w = (int(v) for v in prepared.model.prompt_encoder.image_embedding_size)
    return quantize_encoder(enc_m, dec_m, prepared.spec.preprocess, sets, threshold=options.thresholds.int8_iou,
                            options=o, baked=False, multimask=bool(prepared.spec.multimask),
                            mask_size=(4 * h, 4 * w), progress=say)


class ExportParityError(VerificationError):
    """The parity gate failed; ``report`` has every figure."""

    def __init__(self, message: str, report: ParityReport):
        super().__init__(message)
        self.report = report
