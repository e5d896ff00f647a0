"""Process memory figures (no torch): peak and current resident set size."""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def peak_rss_mib() -> float:
    """Peak resident set size of this process.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this program's own memory. Not ``ru_maxrss``:
    Linux carries it across ``exec``, so a worker started by a large parent (subprocess forks or vforks first)
    would report the parent's size. Elsewhere ``ru_maxrss`` (macOS reports bytes).
    """
    hwm = _proc_status_mib("VmHWM:")
    if hwm is not None:
        return hwm
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20


def _proc_status_mib(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def current_rss_mib() -> float | None:
    """Resident set size of this process now (Linux /proc), or None where unknown."""
    return _proc_status_mib("VmRSS:")
