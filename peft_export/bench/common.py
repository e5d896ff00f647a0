"""Shared benchmark plumbing: timing statistics, machine/software description, isolated peak-memory runs,
result files (JSON + CSV). Torch is imported only where a case needs it."""

from __future__ import annotations

import csv
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
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
    return run_worker(function, kwargs, timeout=timeout, malloc_tuning=False)


def run_worker(function: str, kwargs: dict, *, on_event: Callable[[dict], None] | None = None,
               log: Path | None = None, timeout: float | None = None, malloc_tuning: bool = False) -> dict:
    """Call ``function(**kwargs)`` in a fresh Python process and return its JSON result (the last line it prints).

    Lines the function prints as JSON objects with an ``"event"`` key are passed to ``on_event`` as they come
    (progress). stderr goes to ``log`` (else a temporary file); a failure returns ``{"error": <its last line>}``.
    The worker runs in its own session: Ctrl-C reaches this process only, which forwards one SIGINT to the
    worker (finetune then saves a resumable checkpoint), waits for it to end and raises KeyboardInterrupt.
    """
    env = {**os.environ, "PEFT_EXPORT_MALLOC_TUNING": "1" if malloc_tuning else "0", "PYTHONUNBUFFERED": "1"}
    payload = json.dumps({"function": function, "kwargs": kwargs})
    with (open(log, "w") if log is not None else tempfile.TemporaryFile("w+")) as err:
        proc = subprocess.Popen([sys.executable, "-m", "peft_export.bench._worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env, start_new_session=True)
        timed_out: list[bool] = []
        timer = threading.Timer(timeout, lambda: (timed_out.append(True), proc.kill())) if timeout else None
        if timer is not None:
            timer.start()
        result = None
        restore = _sigterm_as_interrupt()
        try:
            proc.stdin.write(payload)
            proc.stdin.close()
            for line in proc.stdout:
                if not line.startswith("{"):
                    continue
                obj = json.loads(line)
                if "event" in obj and on_event is not None:
                    on_event(obj)
                elif "event" not in obj:
                    result = obj
            code = proc.wait()
        except KeyboardInterrupt:
            _stop(proc)
            raise
        finally:
            restore()
            if timer is not None:
                timer.cancel()
        if code in (130, -signal.SIGINT):  # the worker was interrupted (finetune saved a checkpoint): so is this
            raise KeyboardInterrupt
        if code != 0 or result is None:
            err.flush()
            tail = _last_line(Path(log) if log is not None else err)
            why = f"timed out after {timeout:g} s" if timed_out else f"exit {code}"
            return {"error": f"isolated run failed ({why}): {tail}"}
    return result


def _sigterm_as_interrupt() -> Callable[[], None]:
    """While a worker runs, SIGTERM stops it like Ctrl-C (no orphan keeps running); returns the restorer."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def _raise(signum, frame):
        raise KeyboardInterrupt

    prev = signal.signal(signal.SIGTERM, _raise)
    return lambda: signal.signal(signal.SIGTERM, prev)


def _stop(proc: subprocess.Popen, grace_s: float = 120) -> None:
    """One SIGINT (a finetune saves and exits), then SIGKILL if it has not ended within ``grace_s``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _last_line(src) -> str:
    if isinstance(src, Path):
        text = src.read_text(errors="replace") if src.exists() else ""
    else:
        src.seek(0)
        text = src.read()
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def nothing_measured(rows: list[dict]) -> str | None:
    """The one-line reason when no case of a benchmark was measured (every one skipped), else None."""
    if any("skipped" not in r for r in rows):
        return None
    reasons = "; ".join(f"{r['case']}: {r['skipped']}" for r in rows) or "no cases"
    return f"nothing was measured, every case was skipped ({reasons})"


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
