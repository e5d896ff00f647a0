"""build-engine options and their validation (no TensorRT needed)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from peft_export.errors import UsageError

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_MIN_IOU = {"fp16": 0.99, "int8": 0.95}
DEFAULT_TOLERANCE = 1e-3

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


@dataclass
class EngineOptions:
    precision: str | None = None  # None: the export's precision
    min_points: int = 1
    opt_points: int = 4
    max_points: int = 16
    min_batch: int = 1
    opt_batch: int = 16
    max_batch: int = 64
    encoder_batch: int = 4  # tiles per encoder call: the encoder profile's opt and max (min 1)
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
        if self.encoder_batch < 1:
            raise UsageError(f"--encoder-batch must be at least 1, got {self.encoder_batch}")
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
