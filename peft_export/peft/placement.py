"""Block placement: which image-encoder blocks get the PEFT method.

Syntax (indices are 0-based over the encoder's blocks — ViT blocks, or TinyViT's attention blocks):

- ``all``                every block
- ``late:N``             the last N blocks
- ``late:P%``            the last P percent of the blocks (rounded, at least one): vit_b ``late:50%`` = 6-11,
                         ``late:25%`` = 9-11, ``late:8%`` = 11 (the study's sweep)
- ``6-11``               a range (inclusive)
- ``0,3,9`` / ``0-2,9``  a list of indices and ranges
"""

from __future__ import annotations

import re

from peft_export.errors import UsageError


def _fits(n_blocks: int, model: str) -> str:
    return f"{model or 'the model'} has {n_blocks} encoder blocks (0-{n_blocks - 1})"


def resolve_placement(spec: str | list[int] | None, n_blocks: int, model: str = "") -> list[int]:
    """Sorted, unique block indices for ``spec``; one clear error when it does not fit the model."""
    if spec is None:
        return list(range(n_blocks))
    if isinstance(spec, (list, tuple)):
        idx = sorted({int(i) for i in spec})
    else:
        s = str(spec).strip().lower().replace(" ", "")
        if s in ("all", "*"):
            return list(range(n_blocks))
        m = re.fullmatch(r"late:(\d+(?:\.\d+)?)(%?)", s)
        if m:
            value, pct = float(m.group(1)), bool(m.group(2))
            if pct:
                if not 0 < value <= 100:
                    raise UsageError(f"placement {spec!r}: a percentage must be in (0, 100]")
                count = max(1, round(n_blocks * value / 100))
            else:
                if value != int(value) or value < 1:
                    raise UsageError(f"placement {spec!r}: late:N needs a whole number N >= 1")
                count = int(value)
                if count > n_blocks:
                    raise UsageError(f"placement {spec!r} asks for {count} blocks but {_fits(n_blocks, model)}")
            return list(range(n_blocks - count, n_blocks))
        idx = []
        for part in s.split(","):
            r = re.fullmatch(r"(\d+)-(\d+)", part)
            if r:
                a, b = int(r.group(1)), int(r.group(2))
                if a > b:
                    raise UsageError(f"placement {spec!r}: range {part} is reversed")
                idx.extend(range(a, b + 1))
            elif re.fullmatch(r"\d+", part):
                idx.append(int(part))
            else:
                raise UsageError(f"cannot read placement {spec!r}; use all, late:N, late:P%, 6-11 or 0,3,9")
        idx = sorted(set(idx))
    if not idx:
        raise UsageError(f"placement {spec!r} selects no blocks")
    bad = [i for i in idx if i < 0 or i >= n_blocks]
    if bad:
        raise UsageError(f"placement {spec!r} names block {bad[0]}, but {_fits(n_blocks, model)}")
    return idx
