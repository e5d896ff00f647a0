"""Devices and precisions: one place that turns ``--device`` / ``--precision`` into what torch uses."""

from __future__ import annotations

import contextlib

import torch

from peft_export._memory import peak_rss_mib
from peft_export.errors import UsageError

DEVICES = ("auto", "cpu", "cuda")


def wants_cuda(device: str) -> bool:
    """Whether ``device`` (auto, cpu, cuda) means the CUDA GPU on this machine."""
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def resolve_device(device: str, index: int | None = None) -> torch.device:
    """``auto`` (CUDA when PyTorch sees a GPU), ``cpu`` or ``cuda`` (GPU ``index``, e.g. a process's LOCAL_RANK)."""
    if device not in DEVICES:
        raise UsageError(f"unknown device {device!r}; choose {', '.join(DEVICES[:-1])} or {DEVICES[-1]}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda asked for, but PyTorch sees no CUDA GPU")
        return torch.device("cuda", index) if index is not None else torch.device("cuda")
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: fp16 autocast + GradScaler on CUDA (the study), fp32 on a CPU; fp16/bf16 need CUDA."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision in ("fp16", "bf16") and device.type != "cuda":
        raise UsageError(f"--precision {precision} needs a CUDA device (CPU training runs in fp32)")
    return precision


def autocast(precision: str):
    """The autocast context of a training precision (none for fp32)."""
    if precision in ("fp16", "bf16"):
        return torch.autocast("cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16)
    return contextlib.nullcontext()


def autocast_tag(device: torch.device) -> str:
    """What the current autocast state computes in ("fp32", "amp-torch.float16"): cached values are per tag."""
    if device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return f"amp-{torch.get_autocast_dtype('cuda')}"
    return "fp32"


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations, or the resident set (VmHWM) on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return peak_rss_mib()
    except (ImportError, AttributeError, OSError):
        return float("nan")
