"""Building, checking and publishing the engines (needs TensorRT, cuda-python and a CUDA GPU)."""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from peft_export.data.io import atomic_write
from peft_export.data.samples import sha256_file
from peft_export.errors import DataError, PeftExportError, UsageError, VerificationError
from peft_export.export.tensorrt.options import EngineOptions
from peft_export.export.tensorrt.plan import BuildPlan, EnginePlan, plan_engines
from peft_export.export.tensorrt.verify import check_parity
from peft_export.files import clean_stale, scratch_dir
from peft_export.runtime import tensorrt_env as _env
from peft_export.runtime.tensorrt_backend import (
    ALL_ENGINES,
    ENGINE_FORMAT,
    ENGINE_FORMAT_VERSION,
    ENGINE_META,
    EngineRunner,
)
from peft_export.runtime.tensorrt_env import make_logger

# progress(step name, steps done, steps in all): called before each step of BuildPlan.steps, then ("done", n, n)
Progress = Callable[[str, int, int], None]


def existing_outputs(out_dir: Path) -> list[Path]:
    return [p for p in [out_dir / f for f, _ in ALL_ENGINES.values()] + [out_dir / ENGINE_META] if p.exists()]


@dataclass
class Preflight:
    plan: BuildPlan
    env: dict[str, Any]


def preflight(out_dir: str | os.PathLike, options: EngineOptions | None = None, *, force: bool = False) -> Preflight:
    """Every check that needs no building, in the order a user should hear about problems: options and export;
    existing engines (refused without ``force``); TensorRT, cuda-python and a CUDA GPU (MissingDependencyError,
    exit code 2); what this TensorRT can build at the requested precision. Writes nothing."""
    opts = options or EngineOptions()
    out_dir = Path(out_dir)
    plan = plan_engines(out_dir, opts)
    existing = existing_outputs(out_dir)
    if existing and not force:
        raise UsageError(f"{existing[0]} already exists; pass --force to rebuild the engines")
    env = _env.environment(opts.device)
    return Preflight(plan.with_capabilities(env["capabilities"]), env)


def build_engines(out_dir: str | os.PathLike, options: EngineOptions | None = None, *, force: bool = False,
                  progress: Progress | None = None, info: Callable[[str], None] | None = None,
                  prepared: Preflight | None = None) -> dict[str, Any]:
    """Build, check and publish both engines; returns the ``engine.json`` content.

    After :func:`preflight` (or its result ``prepared``): both engines are built into a temporary folder inside
    OUT_DIR, run on sample inputs and compared with ONNX Runtime; only then moved into place (engine.json last).
    ``progress`` hears of each step of ``plan.steps`` (see :data:`Progress`); ``info(message)`` receives
    messages for the user.
    """
    opts = options or EngineOptions()
    out_dir = Path(out_dir)
    say = info or (lambda msg: None)
    prepared = prepared or preflight(out_dir, opts, force=force)
    clean_stale(out_dir)
    plan, env = prepared.plan, prepared.env
    steps = plan.steps

    def step(name: str) -> None:
        if progress is not None:
            progress(name, steps.index(name) if name in steps else len(steps), len(steps))

    for note in plan.notes:
        say(note)
    say("equivalent trtexec commands:\n" + "\n".join(shlex.join(a) for a in plan.trtexec().values()))
    cache_path = Path(opts.timing_cache) if opts.timing_cache else None
    cache = (cache_path.read_bytes() if cache_path.is_file() else b"") if cache_path is not None else None
    t_start = time.perf_counter()
    with scratch_dir(out_dir / "engines") as tmp:  # recognisable: removed by the next run if this one is killed
        built, cache = _build_all(env, plan, tmp, cache, step)
        parity, io = _load_and_compare(env, plan, tmp, step)
        if opts.verify and not parity["passed"]:
            hint = "--precision fp32, or " if plan.precision != "fp32" else ""
            raise VerificationError(f"the TensorRT engines do not match ONNX Runtime: {parity['failure']}; nothing "
                                    f"was written (try {hint}--tolerance / --min-iou if the difference is acceptable)")
        meta = _metadata(plan, env, tmp, built, io, parity, time.perf_counter() - t_start)
        _publish(plan, tmp, out_dir, meta)
    step("done")
    if cache_path is not None and cache:
        atomic_write(cache_path, lambda p: p.write_bytes(cache))
    return meta


def _build_all(env, plan: BuildPlan, tmp: Path, cache: bytes | None, step) -> tuple[dict[str, float], bytes | None]:
    """Both engines into ``tmp``; one timing cache threaded through both builds."""
    built = {}
    for role, e in plan.engines.items():
        step(f"building {e.engine}")
        built[role], cache = _build_one(env["trt"], env["capabilities"], plan, e, tmp / e.engine, cache)
    return built, cache


def _load_and_compare(env, plan: BuildPlan, tmp: Path, step) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load both engines with the runtime's runner; (parity figures, engine I/O types)."""
    runners = {}
    try:
        for role, e in plan.engines.items():
            step(f"loading {e.engine}")
            runners[role] = EngineRunner(env["trt"], env["cudart"], (tmp / e.engine).read_bytes(), e.engine)
        if plan.options.verify:
            step("comparing with ONNX Runtime")
            parity = check_parity(plan, runners["encoder"], runners["decoder"])
        else:
            parity = {"skipped": True}
        return parity, {role: _engine_io(r) for role, r in runners.items()}
    finally:
        for r in runners.values():
            r.close()


def _publish(plan: BuildPlan, tmp: Path, out_dir: Path, meta: dict[str, Any]) -> None:
    """engine.json goes first out and last in, so it always describes the engines next to it."""
    (tmp / ENGINE_META).write_text(json.dumps(meta, indent=2) + "\n")
    (out_dir / ENGINE_META).unlink(missing_ok=True)
    for e in plan.engines.values():
        os.replace(tmp / e.engine, out_dir / e.engine)
    os.replace(tmp / ENGINE_META, out_dir / ENGINE_META)


# ---- one engine --------------------------------------------------------------------------------------------

def _build_one(trt, caps, plan: BuildPlan, e: EnginePlan, dest: Path,
               cache: bytes | None) -> tuple[float, bytes | None]:
    logger = make_logger(trt, e.engine)
    builder = trt.Builder(logger)
    network, parser = _parse(trt, builder, logger, caps, plan, e)  # the parser owns the weights: keep it alive
    config = _configure(trt, builder, logger, plan, e, cache)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise PeftExportError(f"TensorRT could not build {e.engine} from {e.onnx}: {logger.last_error()} "
                              "(a larger --workspace may help)")
    with open(dest, "wb") as fh:
        fh.write(serialized)
    del serialized, parser
    if cache is not None:
        cache = bytes(memoryview(config.get_timing_cache().serialize()))
    return seconds, cache


def _parse(trt, builder, logger, caps, plan: BuildPlan, e: EnginePlan):
    """The network (strongly typed when the plan says so) parsed from the ONNX file; (network, parser)."""
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
    return network, parser


def _configure(trt, builder, logger, plan: BuildPlan, e: EnginePlan, cache: bytes | None):
    """Builder config: workspace, precision flags (only weak fp16 has any), TF32, the profile, the timing cache."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.options.workspace_bytes)
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
    return config


# ---- engine.json ---------------------------------------------------------------------------------------------

def _engine_io(r: EngineRunner) -> dict[str, Any]:
    return {"inputs": {n: r.dtypes[n].name for n in r.inputs}, "outputs": {n: r.dtypes[n].name for n in r.outputs}}


def _metadata(plan: BuildPlan, env, tmp: Path, built, io, parity, total: float) -> dict[str, Any]:
    import peft_export

    caps, gpu, opts = env["capabilities"], env["gpu"], plan.options
    engines = {}
    for role, e in plan.engines.items():
        f = tmp / e.engine
        engines[role] = {"path": e.engine, "sha256": sha256_file(f), "bytes": f.stat().st_size, "onnx": e.onnx,
                         "onnx_sha256": plan.manifest.files[ALL_ENGINES[role][1]].get("sha256"),
                         "precision": e.precision, "build_seconds": round(built[role], 2), "profile": e.profile,
                         **io[role]}
    return {
        "format": ENGINE_FORMAT, "format_version": ENGINE_FORMAT_VERSION,
        "tensorrt_version": caps["version"],
        "gpu": {k: gpu[k] for k in ("name", "compute_capability", "memory_bytes", "driver_cuda") if k in gpu},
        "precision": plan.precision,
        "build_mode": plan.build_mode,
        "tf32": not plan.no_tf32,
        "export": {"model": plan.manifest.model, "precision": plan.manifest.precision,
                   "baked_preprocessing": plan.manifest.baked_preprocessing},
        "options": {k: v for k, v in opts.to_dict().items() if k not in ("verify", "device")},
        "workspace_bytes": opts.workspace_bytes,
        "timing_cache": str(Path(opts.timing_cache)) if opts.timing_cache else None,
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
