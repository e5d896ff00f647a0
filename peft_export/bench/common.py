"""Shared benchmark plumbing: timing statistics, machine/software description, isolated peak-memory runs,
result files (JSON + CSV). Torch is imported only where a case needs it."""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from peft_export._memory import current_rss_mib, peak_rss_mib  # noqa: F401 (re-exported)
from peft_export.data.io import atomic_write


def stats(times_s: Sequence[float]) -> dict[str, float]:
    """Median, spread and tail of timings (milliseconds), and throughput."""
    t = np.asarray(times_s, np.float64) * 1e3
    if t.size == 0:
        return {}
    p50 = float(np.percentile(t, 50))
    return {
        "n": int(t.size),
        "median_ms": p50,
        "p90_ms": float(np.percentile(t, 90)),
        "p99_ms": float(np.percentile(t, 99)),
        "min_ms": float(t.min()),
        "iqr_ms": float(np.percentile(t, 75) - np.percentile(t, 25)),
        "per_s": 1e3 / p50 if p50 > 0 else float("inf"),
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        return [ln.strip() for ln in out.stdout.splitlines() if ln.strip()] if out.returncode == 0 else []
    except (OSError, subprocess.SubprocessError):
        return []


def machine_info() -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for dist in ("peft-export", "torch", "onnxruntime", "onnxruntime-gpu", "tensorrt", "numpy", "segment-anything"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "memory_gib": mem_gib, "gpus": gpu_names(),
            "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
            "python": platform.python_version(), "versions": versions,
            "malloc_tuning": os.environ.get("PEFT_EXPORT_MALLOC_TUNING", "1") != "0"}


def run_isolated(function: str, kwargs: dict, timeout: float = 3600) -> dict:
    """Call ``function`` ("module:name", JSON-able ``kwargs``) in a fresh process; returns its JSON result.

    Used for peak-memory figures: a fresh process measures one case alone, with glibc's default allocator settings.
    """
    # the allocator tuning (peft_export._malloc) keeps freed memory and fragments the heap: peak RSS would then
    # measure the allocator, not the case (ViT-B all-block LoRA: >15 GB with it, 9.8 GB without)
    env = {**os.environ, "PEFT_EXPORT_MALLOC_TUNING": "0"}
    payload = json.dumps({"function": function, "kwargs": kwargs})
    proc = subprocess.run([sys.executable, "-m", "peft_export.bench._worker"], input=payload, capture_output=True,
                          text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"isolated run failed: {tail}"}
    return json.loads(lines[-1])


def write_results(out_dir: Path, results: dict, rows: list[dict]) -> tuple[Path, Path]:
    """results.json (everything) and results.csv (one row per case), both written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath = atomic_write(out_dir / "results.json",
                         lambda tmp: tmp.write_text(json.dumps(results, indent=2, default=_jsonable) + "\n"))
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)

    def _csv(tmp: Path):
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in keys})

    cpath = atomic_write(out_dir / "results.csv", _csv)
    return jpath, cpath


def _jsonable(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
