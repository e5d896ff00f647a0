"""build-engine options and their validation (no TensorRT needed)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import model_validator

from peft_export.errors import UsageError
from peft_export.options import Options, option

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


class EngineOptions(Options):
    """How ``build-engine`` builds and checks TensorRT engines."""

    family = "engine"
    panel = "Engine"

    precision: Literal["fp32", "fp16", "int8"] | None = option(
        None, "fp32, fp16 or int8 (see the command's help).", default_text="the export's precision")
    min_points: int = option(1, "Fewest points per prompt (padding included).", panel="Decoder profile")
    opt_points: int = option(4, "Points per prompt the decoder is tuned for.", panel="Decoder profile")
    max_points: int = option(16, "Most points per prompt (padding included).", panel="Decoder profile")
    min_batch: int = option(1, "Fewest prompts per decoder call.", panel="Decoder profile")
    opt_batch: int = option(16, "Prompts per call the decoder is tuned for.", panel="Decoder profile")
    max_batch: int = option(64, "Most prompts per call (larger batches are split).", panel="Decoder profile")
    encoder_batch: int = option(4, "Most image tiles per encoder call (the encoder profile's opt and max; predict "
                                "--batch-size up to it).", ge=1)
    workspace: str | int = option("4GiB", "TensorRT workspace limit, e.g. 4GiB, 512MiB (a plain number is MiB).")
    timing_cache: str | None = option(None, "Timing cache file: read if it exists, updated after a successful build.")
    tf32: bool = option(False, "Allow TF32 math in fp32 layers (faster on Ampere and newer; then gated on mask IoU, "
                        "not max |diff|).", cli="--tf32")
    verify: bool = option(True, "Compare the engines with ONNX Runtime; --no-verify skips it (recorded in engine.json "
                          "as unverified).", panel="Gate")
    tolerance: float = option(DEFAULT_TOLERANCE, "fp32 gate: max |diff| / max(1, largest reference value).", gt=0,
                              lt=1, panel="Gate")
    min_iou: float | None = option(None, "fp16/int8 gate: mask IoU vs ONNX Runtime.", gt=0, le=1, panel="Gate",
                                   default_text="0.99 fp16, 0.95 int8")
    device: int = option(0, "CUDA device index.", ge=0)

    @model_validator(mode="after")
    def _ranges(self):
        check_range("points", self.min_points, self.opt_points, self.max_points)
        check_range("batch", self.min_batch, self.opt_batch, self.max_batch)
        parse_size(self.workspace)
        if self.timing_cache:
            object.__setattr__(self, "timing_cache", str(Path(self.timing_cache).expanduser().resolve()))
        return self

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
