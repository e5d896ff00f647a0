"""A study's cases and its budget: what ``study`` plans and ``study_case`` runs (both import this, neither the
other)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from peft_export.errors import UsageError


@dataclass(frozen=True)
class Budget:
    """The same training budget for every case: ``steps``, or ``seconds`` of training steps."""

    steps: int | None = None
    seconds: float | None = None

    @classmethod
    def parse(cls, text: str | int) -> Budget:
        s = str(text).strip().lower().replace(" ", "")
        m = re.fullmatch(r"(\d+(?:\.\d+)?)(steps?|min|m|s)?", s)
        if not m:
            raise UsageError(f"cannot read --budget {text!r}; give steps (30) or minutes (5min) or seconds (90s)")
        value, unit = float(m.group(1)), m.group(2) or "steps"
        if value <= 0:
            raise UsageError(f"--budget must be more than zero, got {text!r} (e.g. 30 steps or 5min)")
        if unit.startswith("step"):
            if value != int(value):
                raise UsageError(f"--budget {text!r}: a number of steps must be whole")
            return cls(steps=int(value))
        return cls(seconds=value * (60 if unit in ("min", "m") else 1))

    def __str__(self) -> str:
        return f"{self.steps} steps" if self.steps else f"{self.seconds / 60:g} min"

    def iterations(self, step_s: list[float]) -> int:
        """Training steps of a case: the budget's steps, or as many as fit in its seconds at ``step_s``."""
        if self.steps:
            return self.steps
        median = sorted(step_s)[len(step_s) // 2] if step_s else math.inf
        return max(1, int(self.seconds // median)) if math.isfinite(median) else 1


@dataclass
class StudyCase:
    method: str
    placement: str
    skipped: str | None = None
    blocks: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.method} {self.placement}"

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{self.method}_{self.placement.replace('%', 'pct')}").strip("-")
