"""Keep freed memory inside the process (glibc) so large tensors do not page-fault on every allocation.

PyTorch on CPU allocates and frees activation-sized buffers on every forward pass. glibc serves large blocks
with mmap and returns them to the kernel on free, so each new tensor is page-faulted in again; on virtual
machines that is expensive. Measured on our 2-core CI machine (LiteMedSAM, 32 box prompts): mask decoding
21 s -> 11.5 s, image encoding 6 s -> 4.6 s (``benchmarks/malloc_tuning.py`` reproduces it).

Called by the CLI and the test suite. Set ``PEFT_EXPORT_MALLOC_TUNING=0`` to leave the allocator alone.
The cost: the process keeps its peak heap until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_done = False


def tune_malloc() -> bool:
    """Disable glibc's mmap for large blocks and heap trimming. Returns True when applied."""
    global _done
    if _done:
        return True
    if os.environ.get("PEFT_EXPORT_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _done = ok
    return ok
