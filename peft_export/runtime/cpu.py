"""What the CPU offers for int8 (torch-free): its name, the relevant instruction-set flags, and a class.

ONNX Runtime's x86 int8 kernels multiply uint8 activations by int8 weights. Without VNNI (AVX2, AVX512F/BW) they
use ``VPMADDUBSW``, which adds two u8×s8 products into a *saturating* int16: with full-range weights
(|w| <= 127) a pair can reach 2·255·127 = 64770 > 32767 and is clipped, so results depend on the CPU. With VNNI
(``VPDPBUSD``) products accumulate straight into int32, no saturation. peft-export's int8 weights use 7 bits
(|w| <= 64: 2·255·64 = 32640 fits int16), so both kernel families compute the same integers. The class is still
recorded with an int8 export's gate figures, and the runtime warns when it runs on another class.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def int8_class(flags: set[str], machine: str) -> str:
    """``avx512-vnni``, ``avx-vnni``, ``avx2`` (no VNNI), ``arm64-dotprod``, ``arm64`` or ``other``."""
    if "avx512_vnni" in flags:
        return "avx512-vnni"
    if "avx_vnni" in flags:
        return "avx-vnni"
    if "avx2" in flags:
        return "avx2"
    if machine in ("aarch64", "arm64"):
        return "arm64-dotprod" if "asimddp" in flags else "arm64"
    return "other"


@lru_cache(maxsize=1)
def cpu_info() -> dict:
    """{"model", "machine", "flags" (the int8-relevant ones present), "int8_class"}; Linux reads /proc/cpuinfo."""
    model, flags = _read_cpuinfo()
    machine = platform.machine().lower()
    present = sorted(f for f in INT8_FLAGS if f in flags)
    return {"model": model or platform.processor() or "unknown", "machine": machine, "flags": present,
            "int8_class": int8_class(flags, machine)}


# bf16 arithmetic on x86: AVX512-BF16 (dot products, Zen 4, Cooper Lake) or AMX (tile matrix units, Sapphire
# Rapids and later). OpenVINO's CPU plugin runs bf16 on either by default (see runtime/openvino_backend.py).
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "amx_int8", "avx512_fp16")
CPU_KINDS = ("amx", "avx512-bf16", "avx512-vnni", "avx2", "other")


@lru_cache(maxsize=1)
def cpu_features() -> dict:
    """``cpu_info()`` plus the bf16 flags, whether the CPU computes bf16 natively and its kind for the README's
    recommendations: amx, avx512-bf16, avx512-vnni (no bf16), avx2 (no AVX512) or other."""
    _, flags = _read_cpuinfo()
    base = cpu_info()
    present = sorted(set(base["flags"]) | {f for f in BF16_FLAGS if f in flags})
    bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    if "amx_bf16" in flags:
        kind = "amx"
    elif "avx512_bf16" in flags:
        kind = "avx512-bf16"
    elif "avx512_vnni" in flags:
        kind = "avx512-vnni"
    elif "avx2" in flags:
        kind = "avx2"
    else:
        kind = "other"
    return {**base, "flags": present, "bf16": bf16, "kind": kind}


def _read_cpuinfo() -> tuple[str, set[str]]:
    model, flags = "", set()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware") and not model:
                model = value.strip()
            elif key in ("flags", "features") and not flags:
                flags = set(value.split())
            if model and flags:
                break
    return model, flags


def describe_run(info) -> dict:
    """What ran, for run summaries: the backend's ``info.describe()`` (backend, stored precision, compute
    precision, its details), plus, on a CPU, the CPU model, kind and flags (``info.details["cpu"]`` when the
    backend recorded them)."""
    out = info.describe()
    if not info.on_gpu and "cpu" not in out:
        features = cpu_features()
        out["cpu"] = {k: features[k] for k in ("model", "kind", "flags")}
    return out
