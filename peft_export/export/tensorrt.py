"""TensorRT engines from an export folder: ``encoder.engine`` + ``decoder.engine`` + ``engine.json``.

    plan = plan_engines("export_dir", EngineOptions(precision="fp16"))   # no TensorRT needed
    print(plan.trtexec_text())                                            # build by hand with trtexec
    meta = build_engines("export_dir", EngineOptions(precision="fp16"))  # TensorRT + CUDA GPU

Torch-free. TensorRT is imported lazily (see :mod:`peft_export.runtime.tensorrt_backend` for the runtime side).

Precision, by feature detection (never by version string):
- the engine's precision equals the export's (``manifest.precision``): a strongly typed network
  (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; always the case on TensorRT 11): the precision is the ONNX
  graph's, fp32 islands of an fp16 export included;
- an fp16 engine from an fp32 export: TensorRT's builder flag ``BuilderFlag.FP16`` (weak typing), which exists up
  to TensorRT 10 only; TensorRT 11 needs an fp16 export (``peft-export export --precision fp16``);
- int8: only from an explicitly quantized graph (QuantizeLinear/DequantizeLinear). ONNX Runtime's dynamic
  quantization (MatMulInteger, ConvInteger, DynamicQuantizeLinear) is for CPUs and TensorRT cannot build it;
  implicit INT8 calibration is deprecated in TensorRT 10 and removed in 11, so it is not offered.

The decoder engine is built from ``decoder_lowres.onnx`` (no ``orig_im_size`` shape tensor) with one optimisation
profile over the number of prompts B and the number of points N. After building, both engines run on sample
inputs and are compared with ONNX Runtime on the same ONNX files (max |diff| for fp32 engines, mask IoU for
fp16/int8); a failed gate leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from peft_export.data.io import atomic_write
from peft_export.data.samples import sha256_file
from peft_export.errors import DataError, MissingDependencyError, PeftExportError, UsageError, VerificationError
from peft_export.manifest import Manifest, read_manifest
from peft_export.runtime import tensorrt_backend as _rt
from peft_export.runtime.tensorrt_backend import (
    DECODER_INPUTS,
    ENGINE_FORMAT,
    ENGINE_FORMAT_VERSION,
    ENGINE_META,
    ENGINES,
    EngineRunner,
    make_logger,
    tensorrt_capabilities,
)

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_MIN_IOU = {"fp16": 0.99, "int8": 0.95}
DEFAULT_TOLERANCE = 1e-3
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
DYNAMIC_INT8_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv"}
BATCHED_DECODER_INPUTS = set(DECODER_INPUTS) - {"image_embeddings"}
POINT_INPUTS = {"point_coords", "point_labels"}


# ---- options ---------------------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 2**20, "b": 1, "k": 1000, "kb": 1000, "kib": 2**10, "ki": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "mi": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "gi": 2**30, "t": 10**12,
          "tb": 10**12, "tib": 2**40, "ti": 2**40}


def parse_size(text: str | int) -> int:
    """'4GiB', '512MiB', '2G', '4096' (a plain number is MiB, as in trtexec) -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    unit = (m.group(2) or "").lower() if m else None
    if m is None or unit not in _UNITS:
        raise UsageError(f"cannot read size {text!r}; write it like 4GiB, 512MiB or 4096 (MiB)")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value < 2**20:
        raise UsageError(f"workspace {text!r} is below 1 MiB; TensorRT needs more (the default is 4GiB)")
    return value


def format_size(nbytes: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size and nbytes % size == 0:
            return f"{nbytes // size}{unit}"
    return f"{nbytes / 2**20:.1f}MiB"


@dataclass
class EngineOptions:
    precision: str | None = None  # None: the export's precision
    min_points: int = 1
    opt_points: int = 4
    max_points: int = 16
    min_batch: int = 1
    opt_batch: int = 16
    max_batch: int = 64
    workspace: str | int = "4GiB"
    timing_cache: str | None = None
    tf32: bool = False  # allow TF32 math in fp32 layers (faster on Ampere+, not fp32-exact)
    verify: bool = True
    tolerance: float = DEFAULT_TOLERANCE  # fp32 engines: max |diff| / max(1, max |reference|)
    min_iou: float | None = None  # fp16/int8 engines: mask IoU vs ONNX Runtime (default 0.99 / 0.95)
    device: int = 0

    def validate(self) -> None:
        if self.precision is not None and self.precision not in PRECISIONS:
            raise UsageError(f"unknown precision {self.precision!r}; choose {', '.join(PRECISIONS)}")
        check_range("points", self.min_points, self.opt_points, self.max_points)
        check_range("batch", self.min_batch, self.opt_batch, self.max_batch)
        parse_size(self.workspace)
        if not 0 < self.tolerance < 1:
            raise UsageError(f"--tolerance must be between 0 and 1, got {self.tolerance}")
        if self.min_iou is not None and not 0 < self.min_iou <= 1:
            raise UsageError(f"--min-iou must be in (0, 1], got {self.min_iou}")

    @property
    def workspace_bytes(self) -> int:
        return parse_size(self.workspace)


def check_range(what: str, lo: int, opt: int, hi: int) -> None:
    """Profile bounds must satisfy 1 <= min <= opt <= max."""
    names = f"--min-{what} {lo}, --opt-{what} {opt}, --max-{what} {hi}"
    if min(lo, opt, hi) < 1:
        raise UsageError(f"{names}: every value must be at least 1")
    if not lo <= opt <= hi:
        bad = f"--min-{what} {lo} > --opt-{what} {opt}" if lo > opt else f"--opt-{what} {opt} > --max-{what} {hi}"
        raise UsageError(f"{bad}: the {what} range needs min <= opt <= max")


# ---- ONNX facts --------------------------------------------------------------------------------------------

@dataclass
class TensorSpec:
    name: str
    dims: list[int | None]  # None: dynamic
    dtype: str


def read_onnx(path: Path) -> tuple[list[TensorSpec], list[TensorSpec], set[str]]:
    """Graph inputs, outputs and the set of op types (functions included), without loading external weights."""
    try:
        import onnx
        from onnx import helper
    except ImportError:
        raise MissingDependencyError("reading the export's graphs needs the onnx package: pip install onnx") from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf errors have no common base class
        raise DataError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    inits = {i.name for i in model.graph.initializer}

    def spec(v) -> TensorSpec:
        t = v.type.tensor_type
        dims = [int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim]
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).name
        except Exception:  # bfloat16/float8 have no numpy type
            dtype = f"onnx-type-{t.elem_type}"
        return TensorSpec(v.name, dims, dtype)

    ops = {n.op_type for n in model.graph.node} | {n.op_type for f in model.functions for n in f.node}
    return ([spec(v) for v in model.graph.input if v.name not in inits], [spec(v) for v in model.graph.output], ops)


# ---- profiles ----------------------------------------------------------------------------------------------

def decoder_profile(inputs: list[TensorSpec], opts: EngineOptions) -> dict[str, dict[str, list[int]]]:
    """min/opt/max shapes of the decoder's dynamic inputs: axis 0 = prompts B (``--*-batch``), axis 1 of
    point_coords/point_labels = points N (``--*-points``). Static axes keep their size."""
    ranges = {"batch": (opts.min_batch, opts.opt_batch, opts.max_batch),
              "points": (opts.min_points, opts.opt_points, opts.max_points)}
    return _profile(inputs, lambda t, axis: "batch" if axis == 0 and t.name in BATCHED_DECODER_INPUTS else
                    "points" if axis == 1 and t.name in POINT_INPUTS else None, ranges, "decoder_lowres.onnx")


def encoder_profile(inputs: list[TensorSpec], img_size: int) -> dict[str, dict[str, list[int]]]:
    """The encoder input is static (1, 3, S, S); with baked preprocessing it is the resized uint8 image
    (h', w', 3) whose longest side is S: its dynamic height/width range over 1..S (opt S)."""
    ranges = {"side": (1, img_size, img_size)}
    return _profile(inputs, lambda t, axis: "side" if axis in (0, 1) and len(t.dims) == 3 else None, ranges,
                    "encoder.onnx")


def _profile(inputs, role_of, ranges, fname) -> dict[str, dict[str, list[int]]]:
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


# ---- the plan (everything decidable without TensorRT) ----------------------------------------------------

@dataclass
class EnginePlan:
    role: str  # encoder | decoder
    onnx: str  # file name inside the export folder
    engine: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    profile: dict[str, dict[str, list[int]]]


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
    ops: set[str] = field(default_factory=set)  # ONNX op types of both graphs (precision decisions)
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

    def with_capabilities(self, capabilities: dict[str, Any]) -> BuildPlan:
        """The same plan for the TensorRT actually installed (precision mode re-decided; graphs not re-read)."""
        precision, mode, notes = resolve_precision(self.manifest, self.options.precision, self.ops, capabilities)
        return BuildPlan(self.out_dir, self.manifest, self.options, precision, mode, self.engines,
                         notes + self.shape_notes, capabilities, self.ops, self.shape_notes)

    def trtexec(self, *, relative: bool = False) -> dict[str, list[str]]:
        """The equivalent trtexec command line of each engine, as argv lists."""
        return {role: trtexec_command(self, role, relative=relative) for role in self.engines}

    def trtexec_text(self, *, relative: bool = False) -> str:
        lines = [f"# {n}" for n in self.notes]
        lines += [shlex.join(argv) for argv in self.trtexec(relative=relative).values()]
        return "\n".join(lines)


def resolve_precision(manifest: Manifest, requested: str | None, ops: set[str],
                      capabilities: dict[str, Any] | None) -> tuple[str, str, list[str]]:
    """(engine precision, build mode, notes) for an export and a requested precision; a clear UsageError when
    this TensorRT (``capabilities``; None = unknown, e.g. for --print-trtexec) cannot build it."""
    exported = manifest.precision
    precision = requested or exported
    notes: list[str] = []
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
    dynamic = sorted(ops & DYNAMIC_INT8_OPS)
    if dynamic:
        raise UsageError(f"this export's graphs use ONNX Runtime dynamic int8 quantization ({', '.join(dynamic)}), "
                         "which runs on CPUs only; TensorRT cannot build it: re-export with `peft-export export "
                         "--precision fp16` (or fp32) and build engines from that")
    has_qdq = bool(ops & QDQ_OPS)
    if precision == "int8":
        if not has_qdq:
            raise UsageError(f"int8 engines need an explicitly quantized ONNX (QuantizeLinear/DequantizeLinear nodes); "
                             f"this export is {exported} without them (TensorRT 11 removed implicit INT8 calibration): "
                             "build --precision fp16 instead")
        return "int8", "strong", notes
    if has_qdq or exported == "int8":
        raise UsageError(f"this export is quantized (int8); a {precision} engine needs an fp32 or fp16 export")
    if precision == exported:
        return precision, "strong", notes
    if precision == "fp16" and exported == "fp32":
        if capabilities is not None and not capabilities["weak_typing"]:
            raise UsageError(f"TensorRT {capabilities['version']} builds strongly typed networks only (no builder "
                             "precision flags): an fp16 engine needs an fp16 export; run `peft-export export ... "
                             "--precision fp16 -o DIR` and build from DIR (or build --precision fp32 here)")
        notes.append("fp16 from an fp32 export via trtexec --fp16 (TensorRT <= 10); TensorRT 11 has no --fp16 and "
                     "needs an fp16 export: `peft-export export ... --precision fp16`")
        return "fp16", "weak-fp16", notes
    raise UsageError(f"this export is {exported}: an {precision} engine needs an {precision} export "
                     f"(`peft-export export ... --precision {precision}`)")


def plan_engines(out_dir: str | os.PathLike, options: EngineOptions | None = None, *,
                 manifest: Manifest | None = None, capabilities: dict[str, Any] | None = None,
                 verify_files: bool = True) -> BuildPlan:
    """Validate the options against the export and derive the profiles and trtexec lines. Needs no TensorRT."""
    opts = options or EngineOptions()
    opts.validate()
    out_dir = Path(out_dir)
    manifest = manifest or read_manifest(out_dir, verify_files=verify_files)
    engines, all_ops = {}, set()
    for role, (engine_name, onnx_role) in ENGINES.items():
        onnx_path = manifest.path_of(out_dir, onnx_role)
        if not onnx_path.is_file():
            raise DataError(f"{onnx_path} is missing; re-export the folder")
        inputs, outputs, ops = read_onnx(onnx_path)
        all_ops |= ops
        if role == "decoder":
            names = {t.name for t in inputs}
            absent = [n for n in DECODER_INPUTS if n not in names]
            if absent or "orig_im_size" in names:
                raise DataError(f"{onnx_path.name} does not have the TensorRT decoder signature (inputs "
                                f"{', '.join(DECODER_INPUTS)}); re-export the folder")
            profile = decoder_profile(inputs, opts)
        else:
            if len(inputs) != 1:
                raise DataError(f"{onnx_path.name} should have one input, has {[t.name for t in inputs]}")
            profile = encoder_profile(inputs, int(manifest.preprocess_spec.img_size))
        engines[role] = EnginePlan(role, onnx_path.name, engine_name, inputs, outputs, profile)
    precision, mode, notes = resolve_precision(manifest, opts.precision, all_ops, capabilities)
    dec = engines["decoder"].profile
    shape_notes = []
    for what, key, axis in (("batch", "point_coords", 0), ("points", "point_coords", 1)):
        want = (getattr(opts, f"min_{what}"), getattr(opts, f"max_{what}"))
        got = (dec[key]["min"][axis], dec[key]["max"][axis]) if key in dec else None
        if got is not None and got != want:
            shape_notes.append(f"decoder_lowres.onnx has a fixed {what} size {got[0]}; --*-{what} options ignored")
    if capabilities is None and mode == "strong":
        notes.append("--stronglyTyped is for TensorRT 10; TensorRT 11 networks are always strongly typed (the flag "
                     "is a deprecated no-op there)")
    return BuildPlan(out_dir, manifest, opts, precision, mode, engines, notes + shape_notes, capabilities, all_ops,
                     shape_notes)


def installed_capabilities() -> dict[str, Any] | None:
    """This machine's TensorRT features when TensorRT is importable (no GPU needed), else None."""
    try:
        return tensorrt_capabilities(_rt.import_tensorrt())
    except MissingDependencyError:
        return None


def _shapes_arg(profile: dict[str, dict[str, list[int]]], key: str) -> str:
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


# ---- building ------------------------------------------------------------------------------------------

def existing_outputs(out_dir: Path) -> list[Path]:
    return [p for p in [out_dir / f for f, _ in ENGINES.values()] + [out_dir / ENGINE_META] if p.exists()]


@dataclass
class Prepared:
    plan: BuildPlan
    env: dict[str, Any]


def preflight(out_dir: str | os.PathLike, options: EngineOptions | None = None, *, force: bool = False) -> Prepared:
    """Every check that needs no building, in the order a user should hear about problems: options and export;
    existing engines (refused without ``force``); TensorRT, cuda-python and a CUDA GPU (MissingDependencyError,
    exit code 2); what this TensorRT can build at the requested precision. Writes nothing."""
    opts = options or EngineOptions()
    out_dir = Path(out_dir)
    plan = plan_engines(out_dir, opts)
    existing = existing_outputs(out_dir)
    if existing and not force:
        raise UsageError(f"{existing[0]} already exists; pass --force to rebuild the engines")
    env = _rt.environment(opts.device)
    return Prepared(plan.with_capabilities(env["capabilities"]), env)


def build_engines(out_dir: str | os.PathLike, options: EngineOptions | None = None, *, force: bool = False,
                  progress=None, info=None, prepared: Prepared | None = None) -> dict[str, Any]:
    """Build, check and publish both engines; returns the ``engine.json`` content.

    After :func:`preflight` (or its result ``prepared``): both engines are built into a temporary folder inside
    OUT_DIR, run on sample inputs and compared with ONNX Runtime; only then moved into place (engine.json last).
    ``progress(step_name)`` is called before each step; ``info(message)`` receives messages for the user.
    """
    opts = options or EngineOptions()
    out_dir = Path(out_dir)
    say = info or (lambda msg: None)
    step = progress or (lambda name: None)
    prepared = prepared or preflight(out_dir, opts, force=force)
    plan, env = prepared.plan, prepared.env
    trt, cudart, gpu, caps = env["trt"], env["cudart"], env["gpu"], env["capabilities"]
    for note in plan.notes:
        say(note)
    say("equivalent trtexec commands:\n" + "\n".join(shlex.join(a) for a in plan.trtexec().values()))
    workspace = opts.workspace_bytes
    cache_path = Path(opts.timing_cache) if opts.timing_cache else None
    cache = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    tmp = Path(tempfile.mkdtemp(prefix=".build-engine-", dir=out_dir))
    t_start = time.perf_counter()
    try:
        built = {}
        for role, e in plan.engines.items():
            step(f"building {e.engine}")
            seconds, cache = _build_one(trt, caps, plan, e, tmp / e.engine, workspace, cache if cache_path else None)
            built[role] = seconds
        runners = {}
        try:
            for role, e in plan.engines.items():
                step(f"loading {e.engine}")
                runners[role] = EngineRunner(trt, cudart, (tmp / e.engine).read_bytes(), e.engine)
            if opts.verify:
                step("comparing with ONNX Runtime")
                parity = check_parity(plan, runners["encoder"], runners["decoder"])
            else:
                parity = {"skipped": True}
            io = {role: _engine_io(r) for role, r in runners.items()}
        finally:
            for r in runners.values():
                r.close()
        if opts.verify and not parity["passed"]:
            hint = "--precision fp32, or " if plan.precision != "fp32" else ""
            raise VerificationError(f"the TensorRT engines do not match ONNX Runtime: {parity['failure']}; nothing "
                                    f"was written (try {hint}--tolerance / --min-iou if the difference is acceptable)")
        meta = _metadata(plan, gpu, caps, tmp, built, io, parity, workspace, cache_path,
                         time.perf_counter() - t_start)
        (tmp / ENGINE_META).write_text(json.dumps(meta, indent=2) + "\n")
        # publish: engine.json goes first out and last in, so it always describes the engines next to it
        (out_dir / ENGINE_META).unlink(missing_ok=True)
        for e in plan.engines.values():
            os.replace(tmp / e.engine, out_dir / e.engine)
        os.replace(tmp / ENGINE_META, out_dir / ENGINE_META)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if cache_path is not None and cache:
        atomic_write(cache_path, lambda p: p.write_bytes(cache))
    return meta


def _build_one(trt, caps, plan: BuildPlan, e: EnginePlan, dest: Path, workspace: int,
               cache: bytes | None) -> tuple[float, bytes | None]:
    logger = make_logger(trt, e.engine)
    builder = trt.Builder(logger)
    flags = 0
    if plan.strongly_typed_flag:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    onnx_path = plan.out_dir / e.onnx
    if not parser.parse_from_file(str(onnx_path)):  # from the file: external weights are found next to it
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        first = (errors[0] if errors else logger.last_error("no details")).strip().splitlines()[0]
        raise DataError(f"TensorRT {caps['version']} cannot parse {onnx_path.name}: {first}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if plan.mode == "weak-fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    if plan.no_tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    if e.profile:
        profile = builder.create_optimization_profile()
        for name, s in e.profile.items():
            profile.set_shape(name, tuple(s["min"]), tuple(s["opt"]), tuple(s["max"]))
        if config.add_optimization_profile(profile) < 0:
            raise DataError(f"TensorRT rejected the optimisation profile of {e.engine}: {logger.last_error()}")
    if cache is not None:
        timing = config.create_timing_cache(cache)
        if timing is None or not config.set_timing_cache(timing, False):
            raise UsageError(f"the timing cache does not fit this TensorRT/GPU ({logger.last_error()}); delete it or "
                             "pass another --timing-cache file")
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise PeftExportError(f"TensorRT could not build {e.engine} from {e.onnx}: {logger.last_error()} "
                              "(a larger --workspace may help)")
    with open(dest, "wb") as fh:
        fh.write(serialized)
    del serialized
    if cache is not None:
        cache = bytes(memoryview(config.get_timing_cache().serialize()))
    return seconds, cache


def _engine_io(r: EngineRunner) -> dict[str, Any]:
    return {"inputs": {n: r.dtypes[n].name for n in r.inputs}, "outputs": {n: r.dtypes[n].name for n in r.outputs}}


def _metadata(plan: BuildPlan, gpu, caps, tmp: Path, built, io, parity, workspace, cache_path, total) -> dict:
    import peft_export

    engines = {}
    for role, e in plan.engines.items():
        src = plan.manifest.files[ENGINES[role][1]]
        f = tmp / e.engine
        engines[role] = {"path": e.engine, "sha256": sha256_file(f), "bytes": f.stat().st_size, "onnx": e.onnx,
                         "onnx_sha256": src.get("sha256"), "build_seconds": round(built[role], 2),
                         "profile": e.profile, **io[role]}
    return {
        "format": ENGINE_FORMAT, "format_version": ENGINE_FORMAT_VERSION,
        "tensorrt_version": caps["version"],
        "gpu": {k: gpu[k] for k in ("name", "compute_capability", "memory_bytes", "driver_cuda") if k in gpu},
        "precision": plan.precision,
        "build_mode": {"strong": "strongly typed (precision from the ONNX graph)",
                       "weak-fp16": "weakly typed, BuilderFlag.FP16"}[plan.mode],
        "tf32": not plan.no_tf32,
        "export": {"model": plan.manifest.model, "precision": plan.manifest.precision,
                   "baked_preprocessing": plan.manifest.baked_preprocessing},
        "options": {k: v for k, v in asdict(plan.options).items() if k not in ("verify", "device")},
        "workspace_bytes": workspace,
        "timing_cache": str(cache_path) if cache_path else None,
        "engines": engines,
        "build_seconds": round(total, 2),
        "parity": parity,
        "verified": not parity.get("skipped", False),
        "trtexec": {role: shlex.join(argv) for role, argv in plan.trtexec(relative=True).items()},
        "notes": plan.notes,
        "versions": {"peft_export": peft_export.__version__, "tensorrt": caps["version"], **_dist_versions()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _dist_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for dist in ("cuda-python", "cuda-bindings", "onnxruntime", "onnxruntime-gpu", "onnx"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


# ---- parity with ONNX Runtime -----------------------------------------------------------------------------

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(double)": np.float64}


class _OrtRunner:
    """ONNX Runtime (CPU) on one graph, inputs cast to the graph's declared types."""

    def __init__(self, path: Path):
        from peft_export.runtime.onnx_backend import _import_ort

        ort = _import_ort()
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.types = {i.name: _ORT_TYPES.get(i.type, np.float32) for i in self.session.get_inputs()}

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        outs = self.session.run(names, {k: np.ascontiguousarray(v, self.types[k]) for k, v in feed.items()
                                        if k in self.types})
        return dict(zip(names, outs))


def sample_image(spec) -> tuple[np.ndarray, str]:
    """The DSB2018 validation tile when the sample data is installed, else a fixed synthetic nuclei image."""
    try:
        from peft_export.data.dataset import dsb2018_tiles

        tile = dsb2018_tiles("val")[0]
        return tile.image, tile.name
    except (PeftExportError, ImportError, OSError):
        rng = np.random.default_rng(0)
        size = int(spec.img_size)
        yy, xx = np.mgrid[:size, :size]
        img = rng.normal(20, 5, (size, size))
        for _ in range(12):
            cy, cx, r = rng.uniform(0.1, 0.9) * size, rng.uniform(0.1, 0.9) * size, rng.uniform(0.04, 0.1) * size
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += rng.uniform(100, 200)
        return np.clip(img, 0, 255).astype(np.uint8), "synthetic nuclei image (sample data not installed)"


def sample_prompts(resized_hw: tuple[int, int], n_points: int, count: int, seed: int) -> tuple[np.ndarray,
                                                                                                    np.ndarray]:
    """``count`` prompts of ``n_points`` each in model-input pixels: a box (+ points) when n_points >= 2,
    else single points; labels 1/0 for points, 2/3 for box corners."""
    h, w = resized_hw
    rng = np.random.default_rng(seed)
    coords = np.zeros((count, n_points, 2), np.float32)
    labels = np.zeros((count, n_points), np.float32)
    for i in range(count):
        k = 0
        if n_points >= 2:
            x0, y0 = rng.uniform(0.05, 0.6) * w, rng.uniform(0.05, 0.6) * h
            x1, y1 = x0 + rng.uniform(0.1, 0.35) * w, y0 + rng.uniform(0.1, 0.35) * h
            coords[i, :2] = [[x0, y0], [min(x1, w - 1), min(y1, h - 1)]]
            labels[i, :2] = [2, 3]
            k = 2
        pts = rng.uniform(0.05, 0.95, (n_points - k, 2)) * [w, h]
        coords[i, k:] = pts
        labels[i, k:] = 1 if k == 0 else rng.integers(0, 2, n_points - k)
        if k == 0:
            labels[i, 0] = 1
    return coords, labels


def _rel_diff(a: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    a = np.asarray(a, np.float64)
    ref = np.asarray(ref, np.float64)
    if not np.isfinite(a).all():
        return math.inf, math.inf
    d = float(np.abs(a - ref).max()) if ref.size else 0.0
    return d, d / max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)


def _mask_ious(a: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(pooled IoU over all masks, smallest per-mask IoU) of logits > 0; masks empty in both count as 1."""
    pa, pr = np.asarray(a) > 0, np.asarray(ref) > 0
    axes = tuple(range(2, pa.ndim))
    inter = np.logical_and(pa, pr).sum(axis=axes).astype(np.float64)
    union = np.logical_or(pa, pr).sum(axis=axes).astype(np.float64)
    per = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    pooled = float(inter.sum() / union.sum()) if union.sum() > 0 else 1.0
    return pooled, float(per.min()) if per.size else 1.0


def check_parity(plan: BuildPlan, encoder: EngineRunner, decoder: EngineRunner) -> dict[str, Any]:
    """Run both engines and ONNX Runtime (same ONNX files) on sample inputs; figures + pass/fail.

    Decoder figures use the ONNX Runtime embedding for both (the decoder alone); the end-to-end mask IoU runs
    TensorRT encoder -> TensorRT decoder against ONNX Runtime -> ONNX Runtime. Prompt sets cover the profile's
    min/opt/max points, a refinement pass (mask_input) and the maximum batch (the prompts repeated).
    """
    from peft_export.runtime.backend import prepare_input

    opts, m = plan.options, plan.manifest
    spec = m.preprocess_spec
    image, image_name = sample_image(spec)
    x, prep = prepare_input(SimpleNamespace(preprocess=spec, baked=bool(m.baked_preprocessing)), image)
    ort_enc = _OrtRunner(plan.out_dir / plan.engines["encoder"].onnx)
    ort_dec = _OrtRunner(plan.out_dir / plan.engines["decoder"].onnx)
    enc_in = encoder.inputs[0]
    enc_out = "image_embeddings" if "image_embeddings" in encoder.outputs else encoder.outputs[0]
    ref_emb = np.asarray(ort_enc.run({enc_in: x})[enc_out], np.float32)
    trt_emb = np.asarray(encoder.run({enc_in: x})[enc_out], np.float32)
    emb_abs, emb_rel = _rel_diff(trt_emb, ref_emb)
    cos = float(np.dot(trt_emb.ravel(), ref_emb.ravel())
                / max(np.linalg.norm(trt_emb) * np.linalg.norm(ref_emb), 1e-30))

    dec_prof = plan.engines["decoder"].profile.get("point_coords")
    if dec_prof is not None:
        n_values = sorted({dec_prof["min"][1], dec_prof["opt"][1], dec_prof["max"][1]})
        b_min, b_max = dec_prof["min"][0], dec_prof["max"][0]
    else:
        fixed = next(t for t in plan.engines["decoder"].inputs if t.name == "point_coords").dims
        n_values, b_min, b_max = [fixed[1]], fixed[0], fixed[0]
    mask_size = tuple(m.mask_input_size)

    def feed(emb, coords, labels, mask_in=None):
        b = len(coords)
        return {"image_embeddings": emb, "point_coords": coords, "point_labels": labels,
                "mask_input": np.zeros((b, 1, *mask_size), np.float32) if mask_in is None else mask_in,
                "has_mask_input": np.zeros(b, np.float32) if mask_in is None else np.ones(b, np.float32)}

    def fit(coords, labels, mask_in=None):
        """Repeat/trim a prompt set to a batch the profile accepts."""
        b = min(max(len(coords), b_min), b_max)
        idx = np.arange(b) % len(coords)
        return coords[idx], labels[idx], None if mask_in is None else mask_in[idx]

    sets = []
    for i, n in enumerate(n_values):
        c, lab = sample_prompts(prep.resized_hw, n, 3, seed=i)
        sets.append((f"{n} point{'s' if n != 1 else ''}", *fit(c, lab)))
    # a refinement pass: the first set's best ONNX Runtime mask as mask_input
    name0, c0, l0, _ = sets[min(1, len(sets) - 1)]
    low0 = ort_dec.run(feed(ref_emb, c0, l0))["low_res_masks"]
    sets.append((f"{name0} + mask_input", c0, l0, np.ascontiguousarray(low0[:, :1], np.float32)))

    figures = {"prompt_sets": {}}
    worst = {"masks_abs": 0.0, "masks_rel": 0.0, "iou_abs": 0.0, "dec_iou": 1.0, "e2e_iou": 1.0, "e2e_min": 1.0}
    for name, c, lab, mi in sets:
        ref = ort_dec.run(feed(ref_emb, c, lab, mi))
        got = decoder.run(feed(ref_emb, c, lab, mi))
        e2e = decoder.run(feed(trt_emb, c, lab, mi))  # TensorRT -> TensorRT vs ref (ONNX Runtime -> ONNX Runtime)
        m_abs, m_rel = _rel_diff(got["low_res_masks"], ref["low_res_masks"])
        i_abs, _ = _rel_diff(got["iou_predictions"], ref["iou_predictions"])
        dec_iou, _ = _mask_ious(got["low_res_masks"], ref["low_res_masks"])
        e_iou, e_min = _mask_ious(e2e["low_res_masks"], ref["low_res_masks"])
        figures["prompt_sets"][name] = {"batch": len(c), "points": int(c.shape[1]), "masks_max_abs_diff": m_abs,
                                        "iou_max_abs_diff": i_abs, "mask_iou": e_iou, "mask_iou_min": e_min}
        worst = {"masks_abs": max(worst["masks_abs"], m_abs), "masks_rel": max(worst["masks_rel"], m_rel),
                 "iou_abs": max(worst["iou_abs"], i_abs), "dec_iou": min(worst["dec_iou"], dec_iou),
                 "e2e_iou": min(worst["e2e_iou"], e_iou), "e2e_min": min(worst["e2e_min"], e_min)}
    # the profile's largest batch: the first set repeated; every copy must equal its original's reference
    name_b, cb, lb, _ = sets[0]
    if b_max > len(cb):
        idx = np.arange(b_max) % len(cb)
        big = decoder.run(feed(ref_emb, cb[idx], lb[idx]))["low_res_masks"]
        ref_small = ort_dec.run(feed(ref_emb, cb, lb))["low_res_masks"]
        bb_abs, bb_rel = _rel_diff(big, ref_small[idx])
        bb_iou, _ = _mask_ious(big, ref_small[idx])
        figures["prompt_sets"][f"{name_b} x batch {b_max}"] = {"batch": b_max, "points": int(cb.shape[1]),
                                                               "masks_max_abs_diff": bb_abs, "mask_iou": bb_iou}
        worst["masks_abs"] = max(worst["masks_abs"], bb_abs)
        worst["masks_rel"] = max(worst["masks_rel"], bb_rel)
        worst["dec_iou"] = min(worst["dec_iou"], bb_iou)

    figures.update({
        "sample": image_name,
        "reference": "onnxruntime CPUExecutionProvider on the same ONNX files",
        "embedding_max_abs_diff": emb_abs, "embedding_rel_diff": emb_rel, "embedding_cosine": cos,
        "masks_max_abs_diff": worst["masks_abs"], "masks_rel_diff": worst["masks_rel"],
        "iou_predictions_max_abs_diff": worst["iou_abs"],
        "decoder_mask_iou": worst["dec_iou"], "mask_iou": worst["e2e_iou"], "mask_iou_min": worst["e2e_min"],
    })
    if plan.precision == "fp32" and not opts.tf32:
        tol = opts.tolerance
        figures["gate"] = f"fp32: max |diff| / max(1, max |reference|) <= {tol:g} (embedding and low-res masks)"
        failed = [f"{what} differs by {rel:.3g} (relative; tolerance {tol:g})"
                  for what, rel in (("the embedding", emb_rel), ("the masks", worst["masks_rel"])) if not rel <= tol]
    else:
        need = opts.min_iou if opts.min_iou is not None else DEFAULT_MIN_IOU.get(plan.precision, 0.99)
        figures["gate"] = f"{plan.precision}{' + TF32' if opts.tf32 else ''}: mask IoU vs ONNX Runtime >= {need:g}"
        failed = [f"mask IoU {iou:.4f} < {need:g} ({what})" for what, iou in
                  (("end to end", worst["e2e_iou"]), ("decoder alone", worst["dec_iou"])) if not iou >= need]
    figures["passed"] = not failed
    figures["failure"] = "; ".join(failed) if failed else None
    return figures
