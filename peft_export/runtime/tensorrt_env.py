"""TensorRT and CUDA without torch: the lazy imports, feature detection, the GPU and a logger (used by the
TensorRT backend, :mod:`peft_export.runtime.tensorrt_backend`, and by ``build-engine``).

GPU memory without torch: `cuda-python <https://nvidia.github.io/cuda-python/>`_ (``cuda.bindings.runtime``,
NVIDIA's official CUDA bindings, the ones TensorRT's own Python samples use). Calls return error codes instead of
crashing, and the package brings its own CUDA runtime, so nothing depends on where a CUDA toolkit is installed.
"""

from __future__ import annotations

import logging
from typing import Any

from peft_export.errors import MissingDependencyError, PeftExportError, UsageError, first_line

log = logging.getLogger(__name__)

INSTALL = "pip install 'peft-export[tensorrt]'"


# ---- optional dependencies (imported lazily; tests replace these two functions) ----------------------------

def import_tensorrt():
    """The ``tensorrt`` module, or a MissingDependencyError that says how to install it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependencyError(f"TensorRT is not installed: {INSTALL} (needs an NVIDIA GPU and driver; "
                                     "`peft-export build-engine DIR --print-trtexec` prints trtexec commands "
                                     "that need no Python TensorRT)") from None
    except OSError as exc:  # the wheel is there but its shared libraries cannot be loaded
        raise MissingDependencyError(f"TensorRT is installed but cannot load its libraries "
                                     f"({first_line(exc)}); reinstall it: {INSTALL}") from None
    return trt


def import_cudart():
    """cuda-python's CUDA runtime bindings (``cuda.bindings.runtime``; ``cuda.cudart`` before cuda-python 12.6)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            raise MissingDependencyError("cuda-python is not installed (the TensorRT runtime uses it to move arrays "
                                         f"to and from the GPU without torch): {INSTALL}") from None
    return cudart


def tensorrt_capabilities(trt) -> dict[str, Any]:
    """What this TensorRT offers, by feature detection (never by version string).

    ``weak_typing``: builder precision flags exist (``BuilderFlag.FP16``; TensorRT <= 10). TensorRT 11 removed
    them (and ``BuilderFlag.INT8``, implicit INT8 calibration): every network is strongly typed and an engine's
    precision is the ONNX graph's.
    ``strongly_typed_flag``: ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` exists (opt-in on TensorRT 10;
    on TensorRT 11 it is deprecated and ignored). Absent before TensorRT 9: such a TensorRT is refused by
    :func:`environment`. ``tf32_flag``: ``BuilderFlag.TF32`` exists (TensorRT 10 and 11).
    """
    flags = getattr(trt, "BuilderFlag", None)
    creation = getattr(trt, "NetworkDefinitionCreationFlag", None)
    return {
        "version": str(getattr(trt, "__version__", "unknown")),
        "weak_typing": flags is not None and hasattr(flags, "FP16"),
        "strongly_typed_flag": creation is not None and hasattr(creation, "STRONGLY_TYPED"),
        "tf32_flag": flags is not None and hasattr(flags, "TF32"),
    }


# ---- CUDA through cuda-python --------------------------------------------------------------------------

def _err_name(cudart, err) -> str:
    try:
        res = cudart.cudaGetErrorName(err)
        name = res[1] if isinstance(res, tuple) else res
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # an unknown code must not hide the original failure
        return f"CUDA error {int(err)}"


def cuda_call(cudart, result, what: str):
    """Unpack a cuda-python ``(error, value...)`` result; a non-zero error raises a one-line PeftExportError."""
    err, rest = result[0], result[1:]
    if int(err) != 0:
        raise PeftExportError(f"CUDA call {what} failed: {_err_name(cudart, err)}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def cuda_device(cudart, device: int = 0) -> dict[str, Any]:
    """Name and compute capability of CUDA device ``device``, or a MissingDependencyError that says why not."""
    err, count = cudart.cudaGetDeviceCount()[:2]
    if int(err) != 0 or not count:
        name = _err_name(cudart, err) if int(err) != 0 else "no devices"
        driver = cudart.cudaDriverGetVersion()
        drv = int(driver[1]) if int(driver[0]) == 0 else 0
        runtime = cudart.cudaRuntimeGetVersion()
        rt = int(runtime[1]) if int(runtime[0]) == 0 else 0
        if drv == 0:
            reason = "no NVIDIA driver is loaded on this machine"
        elif "InsufficientDriver" in name:
            reason = (f"the NVIDIA driver supports CUDA {_cuda_ver(drv)} but the installed cuda-python is built for "
                      f"CUDA {_cuda_ver(rt)}; install the cuda-python that matches the driver, e.g. "
                      f"pip install 'cuda-python>={drv // 1000},<{drv // 1000 + 1}'")
        else:
            reason = name
        raise MissingDependencyError(f"no CUDA GPU available ({reason}); TensorRT engines need an NVIDIA GPU "
                                     f"with its driver, then {INSTALL}")
    if device >= count:
        raise UsageError(f"CUDA device {device} does not exist (this machine has {count})")
    cuda_call(cudart, cudart.cudaSetDevice(device), "cudaSetDevice")
    props = cuda_call(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    raw = props.name
    name = (raw.decode(errors="replace") if isinstance(raw, (bytes, bytearray)) else str(raw)).split("\x00")[0]
    drv = cuda_call(cudart, cudart.cudaDriverGetVersion(), "cudaDriverGetVersion")
    return {"name": name.strip(), "compute_capability": f"{int(props.major)}.{int(props.minor)}",
            "memory_bytes": int(props.totalGlobalMem), "device": device, "driver_cuda": _cuda_ver(int(drv))}


def _cuda_ver(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def environment(device: int = 0) -> dict[str, Any]:
    """TensorRT + cuda-python + a CUDA GPU, or a MissingDependencyError naming what is missing (in that order)."""
    trt = import_tensorrt()
    caps = tensorrt_capabilities(trt)
    if not caps["strongly_typed_flag"]:  # TensorRT 8.x: no strong typing, binding-based API of the past
        raise MissingDependencyError(f"TensorRT {caps['version']} is too old (TensorRT 10 or newer is needed): "
                                     f"{INSTALL}")
    cudart = import_cudart()
    gpu = cuda_device(cudart, device)
    return {"trt": trt, "cudart": cudart, "gpu": gpu, "capabilities": caps}


def make_logger(trt, name: str = "tensorrt"):
    """A TensorRT logger that keeps the error messages (for one-line errors) and sends the rest to logging."""

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            sev = trt.ILogger.Severity
            if severity in (sev.INTERNAL_ERROR, sev.ERROR):
                self.errors.append(str(msg))
                log.debug("%s: %s", name, msg)
            elif severity == sev.WARNING:
                log.debug("%s warning: %s", name, msg)

        def last_error(self, default: str = "see --verbose") -> str:
            return self.errors[-1].splitlines()[0] if self.errors else default

    return _Logger()
