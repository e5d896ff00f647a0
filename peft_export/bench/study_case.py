"""One case of ``benchmark study``, in two fresh processes.

1. memory: :func:`peft_export.bench.train.measure_case_memory`, the same measurement as ``benchmark train`` (set-up,
   warm-up + steps, peak memory; glibc's default allocator), alone in its process. Its step times turn a budget in
   minutes into steps.
2. training: :func:`train_case` runs ``peft_export.train.finetune`` for the case's steps (validation only after the
   last step, so every case gets the same budget and no checkpoint is picked on the validation data) and returns
   the final validation (``peft-export evaluate``'s code: box / point mean IoU and mSA, and whatever else
   finetune's validation reports, e.g. instance-segmentation figures), the step times and the parameter counts.

An interrupted case resumes: ``memory.json`` is kept, and the training continues from ``run/latest.pt``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peft_export._malloc import tune_malloc
from peft_export.bench.cases import Budget, StudyCase
from peft_export.bench.common import run_worker, stats
from peft_export.bench.options import StudySettings, TrainSettings
from peft_export.bench.train import _blocks_label
from peft_export.data.io import atomic_write
from peft_export.errors import UsageError

# finetune validation kinds reported under another name in the study's columns
_KIND_ALIASES = {"auto": "ais", "instance": "ais", "instances": "ais"}
_FIGURE_ALIASES = {"mean_iou": "iou"}


def finetune_values(method: str, placement: str, s: StudySettings, iterations: int) -> dict[str, Any]:
    """The finetune options of one case (also what the recommendation's finetune command line shows)."""
    values = dict(model=s.model, checkpoint=s.checkpoint, data=s.data, val=s.val, peft=method, blocks=placement,
                  iterations=iterations, batch_size=s.batch_size, objects_per_image=s.objects_per_image,
                  sub_iterations=s.sub_iterations, lr=s.lr, seed=s.seed, device=s.device, precision=s.precision,
                  trunk_cache="memory" if s.trunk_cache else "off", rank=s.rank,
                  instance_decoder=True if s.instance_decoder else None)
    return {k: v for k, v in values.items() if v is not None}


def finetune_command(method: str, placement: str, s: StudySettings, iterations: int) -> str:
    """``peft-export finetune ...`` that trains this case again (with finetune's per-epoch validation)."""
    parts = ["peft-export finetune"]
    for k, v in finetune_values(method, placement, s, iterations).items():
        flag = "--" + k.replace("_", "-")
        parts.append(flag if v is True else f"{flag} {v}")
    return " ".join([*parts, "--out", f"runs/{method}_{placement.replace(':', '').replace('%', 'pct')}"])


def _memory_settings(case: StudyCase, s: StudySettings) -> dict:
    return TrainSettings(model=s.model, data=s.data, steps=s.memory_steps, warmup=1, device=s.device,
                         batch_size=s.batch_size, objects_per_image=s.objects_per_image,
                         sub_iterations=s.sub_iterations, trunk_cache=s.trunk_cache, seed=s.seed, rank=s.rank,
                         checkpoint=s.checkpoint, precision=s.precision,
                         extra={"instance_decoder": True} if s.instance_decoder else {}).to_dict()


def run_case(case: StudyCase, s: StudySettings, case_dir: Path, say: Callable[[float, str], None]) -> dict:
    """Measure one case (memory, then training + validation); its result row (``failed`` set on failure)."""
    case_dir.mkdir(parents=True, exist_ok=True)
    t0, load0 = time.perf_counter(), _load()
    mem_file = case_dir / "memory.json"
    mem = json.loads(mem_file.read_text()) if mem_file.is_file() else None
    if mem is None:
        say(0.0, f"{case.name}: memory (fresh process)")
        mem = run_worker("peft_export.bench.train:measure_case_memory",
                         {"method": case.method, "placement": case.placement, "settings": _memory_settings(case, s)},
                         log=case_dir / "memory.log")
        if "error" in mem:
            return _failed(case, f"memory run: {mem['error']}")
        atomic_write(mem_file, lambda tmp: tmp.write_text(json.dumps(mem) + "\n"))
    iterations = Budget.parse(s.budget).iterations(mem["step_s"])
    say(0.1, f"{case.name}: training {iterations} steps")

    def on_event(e: dict) -> None:
        say(0.1 + 0.85 * e["done"] / max(e["total"], 1), f"{case.name}: step {e['done']}/{e['total']}")

    res = run_worker("peft_export.bench.study_case:train_case",
                     {"method": case.method, "placement": case.placement, "settings": s.to_dict(),
                      "run_dir": str(case_dir / "run"), "iterations": iterations},
                     on_event=on_event, log=case_dir / "train.log",
                     malloc_tuning=os.environ.get("PEFT_EXPORT_MALLOC_TUNING", "1") != "0")
    if "error" in res:
        return _failed(case, f"training: {res['error']}")
    row = _row(case, s, mem, res, iterations, time.perf_counter() - t0)
    row["load_avg"] = [load0, _load()]  # the machine's 1-minute load at the case's start and end: shared machines
    return row


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _failed(case: StudyCase, why: str) -> dict:
    return {"case": case.name, "method": case.method, "placement": case.placement, "skipped": f"failed: {why}",
            "failed": True}


def _row(case: StudyCase, s: StudySettings, mem: dict, res: dict, iterations: int, wall_s: float) -> dict:
    # the first step (lazy initialisation) is a warm-up; a resumed, already finished run has none: the memory run's
    steps = res["step_s"][1:] or res["step_s"] or mem["step_s"]
    st = stats(steps)
    params = res["parameters"]
    row: dict[str, Any] = {"case": case.name, "method": case.method, "placement": case.placement,
                           "blocks": _blocks_label(case.blocks), **res["quality"],
                           "steps": iterations, "step_median_s": round(st["median_ms"] / 1e3, 4) if st else None,
                           "step_iqr_s": round(st["iqr_ms"] / 1e3, 4) if st else None,
                           "train_seconds": res["train_seconds"],
                           "peak_memory_mib": round(mem["peak_memory_mib"], 1),
                           "setup_memory_mib": round(mem["setup_memory_mib"], 1),
                           "train_memory_mib": round(mem["peak_memory_mib"] - mem["setup_memory_mib"], 1),
                           "trainable_encoder_params": params["image_encoder"], "trainable_params": params["total"],
                           "total_params": params["all_parameters"], "case_minutes": round(wall_s / 60, 2),
                           "loss_last": res["loss_last"], "finetune": finetune_command(case.method, case.placement,
                                                                                       s, iterations)}
    row["torch_threads"] = res.get("torch_threads")  # intra-op threads (OMP_NUM_THREADS): step times depend on it
    if res.get("resumed"):
        row["resumed"] = True
    if s.instance_decoder and not any(k.startswith("ais_") for k in row):
        row["ais_note"] = "finetune's validation reported no instance-segmentation figures"
    return row


def quality_figures(val: dict | None) -> dict[str, float]:
    """finetune's validation record flattened: ``{"box": {"mean_iou": .8, "msa": .6}}`` -> box_iou, box_msa."""
    out: dict[str, float] = {}
    for kind, figures in (val or {}).items():
        if not isinstance(figures, dict):
            continue
        prefix = _KIND_ALIASES.get(kind, kind)
        for key, v in figures.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{prefix}_{_FIGURE_ALIASES.get(key, key)}"] = round(float(v), 4)
    return out


class _Events:
    """finetune's events: the step times (1 / speed) and one progress line per step on stdout."""

    def __init__(self, total: int):
        self.total = total
        self.step_s: list[float] = []
        self.loss = float("nan")

    def message(self, text: str) -> None: ...

    def start(self, total: int, done: int, info: dict) -> None:
        self.total = total

    def step(self, done: int, loss: float, speed: float) -> None:
        self.step_s.append(1.0 / speed if speed else 0.0)
        self.loss = loss
        print(json.dumps({"event": "step", "done": done, "total": self.total}), flush=True)

    def phase(self, text: str) -> None: ...

    def validation(self, record: dict) -> None: ...


def train_case(method: str, placement: str, settings: dict, run_dir: str, iterations: int) -> dict:
    """Train and validate one case in this (fresh) process; resumes ``run_dir`` when it holds a checkpoint."""
    tune_malloc()  # as the CLI does (the environment says whether)
    from peft_export.train import finetune, resolve_config  # lazy: pulls torch

    s = StudySettings(**settings)
    cfg = resolve_config(cli_values={**finetune_values(method, placement, s, iterations), "val_before": False,
                                     "val_every": 10**6, "early_stopping": 0, "val_prompts": ["box", "point"]})
    run = Path(run_dir)
    resume = (run / "latest.pt").is_file()
    events = _Events(iterations)
    try:
        summary = finetune(cfg, run, resume=resume, force=not resume, events=events)
    except UsageError:
        if not resume:
            raise
        shutil.rmtree(run, ignore_errors=True)  # the saved run does not fit this case any more: start it again
        resume = False
        summary = finetune(cfg, run, force=True, events=events)
    if not s.keep_checkpoints:
        for name in ("best.pt", "latest.pt"):
            (run / name).unlink(missing_ok=True)
    last = summary.get("last") or {}
    import torch

    return {"quality": quality_figures(last.get("val")), "step_s": events.step_s, "resumed": resume,
            "torch_threads": torch.get_num_threads(),
            "train_seconds": summary["train_seconds"], "parameters": summary["trainable_parameters"],
            "loss_last": round(float(last["train_loss"]), 5) if last.get("train_loss") is not None else None}
