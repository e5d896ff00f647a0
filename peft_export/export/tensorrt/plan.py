"""The build plan: everything about the engines that is decidable without TensorRT — the graphs' facts, the
optimisation profiles, the precision and build mode per TensorRT version, and the equivalent trtexec lines."""

from __future__ import annotations

import math
import os
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from peft_export.errors import DataError, MissingDependencyError, UsageError
from peft_export.export.tensorrt.graph import INTEGER_INT8_OPS, GraphFacts, TensorSpec, qdq_refusal, read_onnx
from peft_export.export.tensorrt.options import PRECISIONS, EngineOptions
from peft_export.manifest import Manifest, read_manifest
from peft_export.runtime import tensorrt_env as _env
from peft_export.runtime.tensorrt_backend import (
    ALL_ENGINES,
    DECODER_INPUTS,
    ENGINES,
    OPTIONAL_ENGINES,
)
from peft_export.runtime.tensorrt_env import tensorrt_capabilities

BATCHED_DECODER_INPUTS = set(DECODER_INPUTS) - {"image_embeddings"}
POINT_INPUTS = {"point_coords", "point_labels"}
Profile = dict[str, dict[str, list[int]]]


# ---- profiles ----------------------------------------------------------------------------------------------

def decoder_profile(inputs: list[TensorSpec], opts: EngineOptions) -> Profile:
    """min/opt/max shapes of the decoder's dynamic inputs: axis 0 = prompts B (``--*-batch``), axis 1 of
    point_coords/point_labels = points N (``--*-points``). Static axes keep their size."""
    ranges = {"batch": (opts.min_batch, opts.opt_batch, opts.max_batch),
              "points": (opts.min_points, opts.opt_points, opts.max_points)}
    return _profile(inputs, lambda t, axis: "batch" if axis == 0 and t.name in BATCHED_DECODER_INPUTS else
                    "points" if axis == 1 and t.name in POINT_INPUTS else None, ranges, "decoder_lowres.onnx")


def encoder_profile(inputs: list[TensorSpec], img_size: int, batch: int = 1) -> Profile:
    """The encoder input (B, 3, S, S): a dynamic batch axis B (current exports) ranges over 1..``batch`` (opt
    ``batch``: the runtime fills batches of tiles); exports before the batch axis are static (1, 3, S, S). With baked
    preprocessing it is the resized uint8 image (h', w', 3) whose longest side is S: its dynamic height/width
    range over 1..S (opt S)."""
    ranges = {"side": (1, img_size, img_size), "batch": (1, batch, batch)}
    return _profile(inputs, lambda t, axis: "side" if axis in (0, 1) and len(t.dims) == 3 else
                    "batch" if axis == 0 and len(t.dims) == 4 else None, ranges, "encoder.onnx")


def _profile(inputs, role_of, ranges, fname) -> Profile:
    out = {}
    for t in inputs:
        if all(d is not None for d in t.dims):
            continue
        shapes = {"min": [], "opt": [], "max": []}
        for axis, d in enumerate(t.dims):
            if d is not None:
                vals = (d, d, d)
            else:
                role = role_of(t, axis)
                if role is None:
                    raise DataError(f"{fname}: input {t.name} has a dynamic axis {axis} that build-engine does not "
                                    "know how to bound; re-export it with peft-export export")
                vals = ranges[role]
            for key, v in zip(("min", "opt", "max"), vals):
                shapes[key].append(int(v))
        out[t.name] = shapes
    return out


# ---- precision -----------------------------------------------------------------------------------------------

class Resolved(NamedTuple):
    precision: str  # the engines' precision as a whole (int8: the encoder's)
    mode: str  # "strong" (precision from the graph) | "weak-fp16" (TensorRT <= 10 BuilderFlag.FP16)
    notes: list[str]
    engines: dict[str, str]  # role -> that engine's precision (int8 export: encoder int8, decoder fp32)


def resolve_precision(manifest: Manifest, requested: str | None, graphs: dict[str, GraphFacts],
                      capabilities: dict[str, Any] | None) -> Resolved:
    """Precision and build mode for an export and a requested precision; a clear UsageError when this TensorRT
    (``capabilities``; None = unknown, e.g. for --print-trtexec) cannot build it. ``graphs``: role -> facts."""
    exported = manifest.precision
    precision = requested or exported
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
    integer = sorted(set().union(*(g.ops for g in graphs.values())) & INTEGER_INT8_OPS)
    if integer:
        raise UsageError(f"this export's graphs use ONNX Runtime dynamic int8 quantization ({', '.join(integer)}), "
                         "which runs on CPUs only; TensorRT cannot build it: re-export with static symmetric int8 "
                         "Q/DQ quantization, or with `peft-export export --precision fp16` (or fp32)")
    if precision == "int8":
        return _resolve_int8(exported, graphs)
    if any(g.qdq_nodes for g in graphs.values()) or exported == "int8":
        raise UsageError(f"this export is quantized (int8); a {precision} engine needs an fp32 or fp16 export")
    same = {role: precision for role in graphs}
    if precision == exported:
        return Resolved(precision, "strong", [], same)
    if precision == "fp16" and exported == "fp32":
        if capabilities is not None and not capabilities["weak_typing"]:
            raise UsageError(f"TensorRT {capabilities['version']} builds strongly typed networks only (no builder "
                             "precision flags): an fp16 engine needs an fp16 export; run `peft-export export ... "
                             "--precision fp16 -o DIR` and build from DIR (or build --precision fp32 here)")
        return Resolved("fp16", "weak-fp16", ["fp16 from an fp32 export via trtexec --fp16 (TensorRT <= 10); "
                                              "TensorRT 11 has no --fp16 and needs an fp16 export: `peft-export "
                                              "export ... --precision fp16`"], same)
    raise UsageError(f"this export is {exported}: an {precision} engine needs an {precision} export "
                     f"(`peft-export export ... --precision {precision}`)")


def _resolve_int8(exported: str, graphs: dict[str, GraphFacts]) -> Resolved:
    """Explicit quantization only: the encoder's Q/DQ nodes, symmetric int8, built strongly typed.

    NVIDIA's guides: use explicit quantization with strong typing, without precision builder flags (a strongly
    typed network refuses them: trtexec ``--stronglyTyped`` with ``--int8`` is an error). A weakly typed Q/DQ
    network would need ``BuilderFlag.INT8`` on TensorRT 10, which TensorRT 11 removed — so there is one route for
    both versions. Implicit INT8 calibration is deprecated in 10 and removed in 11: not offered."""
    encoder = graphs["encoder"]
    if not encoder.qdq_nodes:
        raise UsageError(f"int8 engines need an explicitly quantized {encoder.name} (QuantizeLinear/DequantizeLinear "
                         f"nodes); this export is {exported} without them (TensorRT 11 removed implicit INT8 "
                         "calibration): build --precision fp16 instead")
    for graph in graphs.values():
        why = qdq_refusal(graph)
        if why:
            raise UsageError(why)
    engines = {role: "int8" if g.qdq_nodes else "fp32" for role, g in graphs.items()}
    floats = [graphs[r].name for r, p in engines.items() if p != "int8"]
    note = (f"int8: explicit quantization (symmetric int8 Q/DQ in {encoder.name}), built strongly typed without "
            "--int8 (strongly typed networks refuse precision flags; TensorRT 11 removed them)")
    if floats:
        note += f"; {' and '.join(floats)}: float32, built in fp32"
    return Resolved("int8", "strong", [note], engines)


def installed_capabilities() -> dict[str, Any] | None:
    """This machine's TensorRT features when TensorRT is importable (no GPU needed), else None."""
    try:
        return tensorrt_capabilities(_env.import_tensorrt())
    except MissingDependencyError:
        return None


# ---- the plan --------------------------------------------------------------------------------------------------

@dataclass
class EnginePlan:
    role: str  # encoder | decoder
    onnx: str  # file name inside the export folder
    engine: str
    graph: GraphFacts
    profile: Profile
    precision: str = "fp32"  # this engine's (set by the precision decision)

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.graph.inputs


@dataclass
class BuildPlan:
    out_dir: Path
    manifest: Manifest
    options: EngineOptions
    precision: str
    mode: str  # "strong" (precision from the graph) | "weak-fp16" (TensorRT <= 10 BuilderFlag.FP16)
    engines: dict[str, EnginePlan]
    notes: list[str] = field(default_factory=list)
    capabilities: dict[str, Any] | None = None  # None: no TensorRT here (e.g. --print-trtexec)
    shape_notes: list[str] = field(default_factory=list)

    @property
    def strongly_typed_flag(self) -> bool:
        """Ask for a strongly typed network explicitly: TensorRT 10 (opt-in). TensorRT 11 is strongly typed
        always; its ``STRONGLY_TYPED`` creation flag and trtexec ``--stronglyTyped`` are deprecated no-ops there,
        so they are left out when this TensorRT has no weak typing."""
        caps = self.capabilities
        return self.mode == "strong" and (caps is None or (caps["weak_typing"] and caps["strongly_typed_flag"]))

    @property
    def no_tf32(self) -> bool:
        """TF32 is switched off (TensorRT enables it by default) unless --tf32: fp32 layers, including the fp32
        islands of an fp16 graph, stay fp32-exact."""
        caps = self.capabilities
        return not self.options.tf32 and (caps is None or caps["tf32_flag"])

    @property
    def build_mode(self) -> str:
        """How the engines are built, in words (engine.json ``build_mode``)."""
        if self.mode == "weak-fp16":
            return "weakly typed, BuilderFlag.FP16"
        quantized = [e.onnx for e in self.engines.values() if e.precision == "int8"]
        if not quantized:
            return "strongly typed (precision from the ONNX graph)"
        floats = "".join(f"; {e.onnx} {e.precision}" for e in self.engines.values() if e.precision != "int8")
        return f"strongly typed, explicit int8 quantization (symmetric Q/DQ in {', '.join(quantized)}{floats})"

    @property
    def steps(self) -> list[str]:
        """The steps :func:`build_engines` reports to its progress callback, in order."""
        names = [f"building {e.engine}" for e in self.engines.values()]
        names += [f"loading {e.engine}" for e in self.engines.values()]
        return names + (["comparing with ONNX Runtime"] if self.options.verify else [])

    def with_capabilities(self, capabilities: dict[str, Any] | None) -> BuildPlan:
        """The same plan for this TensorRT (precision and mode re-decided; the graphs are not re-read)."""
        graphs = {role: e.graph for role, e in self.engines.items()}
        precision, mode, notes, per_engine = resolve_precision(self.manifest, self.options.precision, graphs,
                                                               capabilities)
        if capabilities is None and mode == "strong":
            notes = [*notes, "--stronglyTyped is for TensorRT 10; TensorRT 11 networks are always strongly typed "
                             "(the flag is a deprecated no-op there)"]
        engines = {role: replace(e, precision=per_engine[role]) for role, e in self.engines.items()}
        return replace(self, precision=precision, mode=mode, engines=engines, notes=notes + self.shape_notes,
                       capabilities=capabilities)

    def trtexec(self, *, relative: bool = False) -> dict[str, list[str]]:
        """The equivalent trtexec command line of each engine, as argv lists."""
        return {role: trtexec_command(self, role, relative=relative) for role in self.engines}

    def trtexec_text(self, *, relative: bool = False) -> str:
        lines = [f"# {n}" for n in self.notes]
        lines += [shlex.join(argv) for argv in self.trtexec(relative=relative).values()]
        return "\n".join(lines)


def plan_engines(out_dir: str | os.PathLike, options: EngineOptions | None = None, *,
                 manifest: Manifest | None = None, capabilities: dict[str, Any] | None = None,
                 verify_files: bool = True) -> BuildPlan:
    """Validate the options against the export and derive the profiles and trtexec lines. Needs no TensorRT."""
    opts = options or EngineOptions()
    out_dir = Path(out_dir)
    manifest = manifest or read_manifest(out_dir, verify_files=verify_files)
    engines = {role: _engine_plan(out_dir, manifest, role, opts) for role in ENGINES}
    for role, (_, onnx_role) in OPTIONAL_ENGINES.items():  # the instance decoder (issue 14), when exported
        if onnx_role in manifest.files:
            engines[role] = _engine_plan(out_dir, manifest, role, opts)
    dec = engines["decoder"].profile
    shape_notes = []
    for what, axis in (("batch", 0), ("points", 1)):
        want = (getattr(opts, f"min_{what}"), getattr(opts, f"max_{what}"))
        got = (dec["point_coords"]["min"][axis], dec["point_coords"]["max"][axis]) if "point_coords" in dec else None
        if got is not None and got != want:
            shape_notes.append(f"decoder_lowres.onnx has a fixed {what} size {got[0]}; --*-{what} options ignored")
    plan = BuildPlan(out_dir, manifest, opts, "", "", engines, shape_notes=shape_notes)
    return plan.with_capabilities(capabilities)


def _engine_plan(out_dir: Path, manifest: Manifest, role: str, opts: EngineOptions) -> EnginePlan:
    engine_name, onnx_role = ALL_ENGINES[role]
    onnx_path = manifest.path_of(out_dir, onnx_role)
    if not onnx_path.is_file():
        raise DataError(f"{onnx_path} is missing; re-export the folder")
    graph = read_onnx(onnx_path)
    if role == "decoder":
        names = {t.name for t in graph.inputs}
        if any(n not in names for n in DECODER_INPUTS) or "orig_im_size" in names:
            raise DataError(f"{onnx_path.name} does not have the TensorRT decoder signature (inputs "
                            f"{', '.join(DECODER_INPUTS)}); re-export the folder")
        profile = decoder_profile(graph.inputs, opts)
    elif role == "instance_decoder":  # (B, C, h, w) embeddings: batch 1..--encoder-batch, like the encoder's tiles
        profile = _profile(graph.inputs, lambda t, axis: "batch" if axis == 0 else None,
                           {"batch": (1, opts.encoder_batch, opts.encoder_batch)}, onnx_path.name)
    else:
        if len(graph.inputs) != 1:
            raise DataError(f"{onnx_path.name} should have one input, has {[t.name for t in graph.inputs]}")
        profile = encoder_profile(graph.inputs, int(manifest.preprocess_spec.img_size), opts.encoder_batch)
    return EnginePlan(role, onnx_path.name, engine_name, graph, profile)


def _shapes_arg(profile: Profile, key: str) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[key])}" for name, shapes in profile.items())


def trtexec_command(plan: BuildPlan, role: str, *, relative: bool = False) -> list[str]:
    """trtexec argv equivalent to what :func:`build_engines` does for ``role``."""
    e = plan.engines[role]
    where = (lambda name: name) if relative else (lambda name: str(plan.out_dir / name))
    argv = ["trtexec", f"--onnx={where(e.onnx)}", f"--saveEngine={where(e.engine)}"]
    if e.profile:
        argv += [f"--{key}Shapes={_shapes_arg(e.profile, key)}" for key in ("min", "opt", "max")]
    if plan.mode == "weak-fp16":
        argv.append("--fp16")
    elif plan.strongly_typed_flag:
        argv.append("--stronglyTyped")
    if plan.no_tf32:
        argv.append("--noTF32")
    argv.append(f"--memPoolSize=workspace:{math.ceil(plan.options.workspace_bytes / 2**20)}")
    if plan.options.timing_cache:
        argv.append(f"--timingCacheFile={plan.options.timing_cache}")
    argv.append("--skipInference")
    return argv
