"""Training benchmark: step time, peak memory and trainable parameters per (PEFT method, block placement).

Each case is the finetune recipe's real training step (``Trainer._train_step``: interactive prompts, sub-iterations,
Dice + IoU loss, AdamW update) on the same data, with the same seed, so cases differ only in method and placement.

Timing: all cases are built in one process and stepped round-robin (step 1 of every case, then step 2, ...), so
machine drift hits every case alike; each figure is also given as a ratio to a baseline case of the same run
(default: LoRA on all blocks, the placement the study compares against). Peak memory: each case runs again alone
in a fresh process (peak RSS on the CPU — inherited allocations of other cases would hide differences; CUDA:
``max_memory_allocated``). The frozen-trunk cache is off unless asked for, so step times are those of the method.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft_export.bench.common import current_rss_mib, machine_info, peak_rss_mib, run_isolated, stats, write_results
from peft_export.bench.options import TrainSettings
from peft_export.bench.plots import plot_train
from peft_export.errors import PeftExportError, UsageError
from peft_export.peft.placement import resolve_placement
from peft_export.train.data import STREAM_IMAGE, rng_for

DEFAULT_METHODS = ("lora",)
DEFAULT_PLACEMENTS = ("all", "late:50%", "late:25%", "late:1")


@dataclass
class TrainCase:
    method: str
    placement: str
    skipped: str | None = None
    step_s: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.method} {self.placement}"


class CaseRunner:
    """One (method, placement) case: a Trainer set up in a scratch folder, stepped one training step at a time."""

    def __init__(self, method: str, placement: str, s: TrainSettings, scratch: Path):
        import torch

        from peft_export.train import Trainer, resolve_config  # lazy: pulls torch
        from peft_export.train.trainer import set_train_mode  # lazy: pulls segment_anything, torch, torchvision

        self._torch = torch
        cfg = resolve_config(cli_values=dict(
            model=s.model, data=s.data, peft=method, blocks=placement, iterations=10**9, batch_size=s.batch_size,
            objects_per_image=s.objects_per_image, sub_iterations=s.sub_iterations, lr=1e-4, val_before=False,
            device=s.device, precision=s.precision, trunk_cache="memory" if s.trunk_cache else "off", seed=s.seed,
            **s.extra, **({"rank": s.rank} if s.rank is not None else {}),
            **({"checkpoint": s.checkpoint} if s.checkpoint else {})))
        self.trainer = Trainer(cfg, scratch, force=True)
        self.trainer.setup()
        set_train_mode(self.trainer.model)
        self.settings = s
        self.order = self.trainer.data.epoch_order(s.seed, 0, None, s.batch_size)
        self.iteration = 0
        counts = self.trainer.counts
        self.info = {"trainable_params": int(sum(p.numel() for p in self.trainer.params)),
                     "total_params": int(sum(p.numel() for p in self.trainer.model.parameters())),
                     "trainable_encoder_params": int(counts.get("image_encoder", 0))
                     if isinstance(counts, dict) else None,
                     "blocks": list(self.trainer.peft_config.blocks or []),
                     "trunk_cache": self.trainer.cache_note or "on"}

    def step(self) -> tuple[float, float]:
        """One training step (same images and prompts for every case); returns (seconds, loss)."""
        from peft_export.train.recipe import prompt_kind  # lazy: pulls segment_anything, torch, torchvision

        tr, s, it = self.trainer, self.settings, self.iteration
        n = len(self.order) // s.batch_size
        k = it % max(n, 1)
        rngs = [rng_for(s.seed, STREAM_IMAGE, 0, it, j) for j in range(s.batch_size)]
        views = [tr.data.view(self.order[(k * s.batch_size + j) % len(self.order)], r) for j, r in enumerate(rngs)]
        cuda = tr.device.type == "cuda"
        if cuda:
            self._torch.cuda.synchronize(tr.device)
        t0 = time.perf_counter()
        loss, *_ = tr._train_step(views, prompt_kind(it), rngs)
        if cuda:
            self._torch.cuda.synchronize(tr.device)
        dt = time.perf_counter() - t0
        self.iteration += 1
        return dt, float(loss)

    def peak_memory_mib(self) -> float:
        if self.trainer.device.type == "cuda":
            return self._torch.cuda.max_memory_allocated(self.trainer.device) / 2**20
        return peak_rss_mib()

    def current_memory_mib(self) -> float:
        """Memory held now (after set-up: model, optimizer, data): CUDA allocated, or the process's RSS."""
        if self.trainer.device.type == "cuda":
            return self._torch.cuda.memory_allocated(self.trainer.device) / 2**20
        rss = current_rss_mib()
        return rss if rss is not None else self.peak_memory_mib()

    def close(self) -> None:
        self.trainer.close()


def plan_cases(methods: list[str], placements: list[str], s: TrainSettings) -> list[TrainCase]:
    from peft_export.models.registry import MODELS  # lazy: pulls segment_anything, torch, torchvision
    from peft_export.peft import METHODS  # lazy: pulls torch

    if s.model not in MODELS:
        raise UsageError(f"unknown model {s.model!r}; choose one of: {', '.join(MODELS)}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise UsageError(f"unknown PEFT method {bad[0]!r}; choose from: {', '.join(METHODS)}")
    if s.steps < 1 or s.warmup < 0:
        raise UsageError("--steps must be >= 1 and --warmup >= 0")
    for p in placements:
        resolve_placement(p, 10**4)  # syntax now; whether it fits the model is known once it is built
    cases = []
    for m in methods:
        for p in placements:
            case = TrainCase(m, p)
            if not METHODS[m].uses_placement and p != placements[0]:
                case.skipped = f"{m} does not use a placement: measured once (with {placements[0]})"
            cases.append(case)
    return cases


def _device_skip(device: str) -> str | None:
    if device != "cuda":
        return None
    import torch

    return None if torch.cuda.is_available() else "CUDA is not available here (no GPU or a CPU build of torch)"


def run_train_benchmark(methods: list[str], placements: list[str], settings: TrainSettings | None = None, *,
                        baseline: str | None = None, progress: Callable[[str, int], None] | None = None,
                        cases: list[TrainCase] | None = None) -> dict:
    """Time every case round-robin, then measure each one's peak memory alone; returns the results dict.

    ``progress(text, n)`` is called with ``n`` units done out of ``work_units(...)`` (set-up messages carry 0).
    ``cases``: from :func:`plan_cases` when the caller planned (and so validated) them already.
    """
    s = settings or TrainSettings()
    say = progress or (lambda text, n: None)
    cases = cases if cases is not None else plan_cases(methods, placements, s)
    weights_dir = None
    from peft_export.models.registry import get_spec  # lazy: pulls segment_anything, torch, torchvision

    weights = s.checkpoint or ("random (test model)" if get_spec(s.model).test_only else "bundled")
    if s.checkpoint is None and _needs_random_weights(s.model):
        say(f"no weights for {s.model}: random weights (step time and memory do not depend on their values)", 0)
        weights_dir = Path(tempfile.mkdtemp(prefix="peft_export_bench_weights_"))
        s = s.replace(checkpoint=_random_checkpoint(s.model, weights_dir))
        weights = "random"
    try:
        return _run(cases, methods, placements, s, baseline, say, weights)
    finally:
        if weights_dir is not None:
            shutil.rmtree(weights_dir, ignore_errors=True)


def _needs_random_weights(model: str) -> bool:
    from peft_export.loading import default_weights  # lazy: pulls segment_anything, torch, torchvision
    from peft_export.models.registry import get_spec  # lazy: pulls segment_anything, torch, torchvision

    return default_weights(model) is None and not get_spec(model).test_only


def _random_checkpoint(model: str, folder: Path) -> str:
    import torch

    from peft_export.models.registry import build_sam  # lazy: pulls segment_anything, torch, torchvision

    torch.manual_seed(0)
    path = folder / f"{model}_random.pt"
    torch.save(build_sam(model).state_dict(), path)
    return str(path)


def _run(cases, methods, placements, s: TrainSettings, baseline, say, weights: str) -> dict:
    reason = _device_skip(s.device)
    if reason:
        for c in cases:
            c.skipped = c.skipped or reason
    scratch = Path(tempfile.mkdtemp(prefix="peft_export_bench_train_"))
    runners: dict[str, CaseRunner] = {}
    try:
        for i, c in enumerate(cases):
            if c.skipped:
                continue
            say(f"setting up {c.name}", 0)
            try:
                runners[c.name] = CaseRunner(c.method, c.placement, s, scratch / f"case{i}")
                c.info = runners[c.name].info
            except PeftExportError as exc:
                c.skipped = f"cannot set up: {exc}"
        say("skipped cases", _units(s) * sum(c.skipped is not None for c in cases))
        _step_round_robin([c for c in cases if c.skipped is None], runners, s, say)
    finally:
        for runner in runners.values():
            runner.close()
        runners.clear()
        shutil.rmtree(scratch, ignore_errors=True)

    base = _pick_baseline([c for c in cases if c.skipped is None], baseline)
    rows = [_result_row(c, base, s) for c in cases]
    if s.memory:
        _measure_memory(cases, rows, s, say)
        if base is not None:
            brow = next(r for r in rows if r["case"] == base.name)
            for key, ratio in (("peak_memory_mib", "memory_vs_baseline"),
                               ("train_memory_mib", "train_memory_vs_baseline")):
                for r in rows:
                    if brow.get(key) and r.get(key) is not None:
                        r[ratio] = round(r[key] / brow[key], 3)
    return {"kind": "train", "machine": machine_info(),
            "settings": {**s.to_dict(), "checkpoint": weights, "methods": list(methods),
                         "placements": list(placements),
                         "baseline": base.name if base else None,
                         "order": "round-robin over cases per step; memory: each case alone in a fresh process",
                         "memory_kind": "cuda max_memory_allocated" if s.device == "cuda" else "peak RSS"},
            "cases": rows}


def _step_round_robin(active: list[TrainCase], runners: dict[str, CaseRunner], s: TrainSettings, say) -> None:
    """One step per case per round (warm-up rounds untimed); a case whose loss is not finite drops out."""
    for r in range(s.warmup + s.steps):
        for c in active:
            say(f"{'warm-up' if r < s.warmup else 'step'} {r + 1}/{s.warmup + s.steps}: {c.name}", 0)
            dt, loss = runners[c.name].step()
            say(c.name, 1)
            if not math.isfinite(loss):
                c.skipped = f"loss became {loss} at step {r + 1}"
                say(c.name, _units(s) - r - 1)
            if r >= s.warmup:
                c.step_s.append(dt)
            c.losses.append(loss)
        active = [c for c in active if c.skipped is None]


def _result_row(c: TrainCase, base: TrainCase | None, s: TrainSettings) -> dict[str, Any]:
    row: dict[str, Any] = {"case": c.name, "method": c.method, "placement": c.placement}
    if c.skipped:
        row["skipped"] = c.skipped
        return row
    st = stats(c.step_s)
    row.update({"step_median_s": round(st["median_ms"] / 1e3, 4), "step_iqr_s": round(st["iqr_ms"] / 1e3, 4),
                "step_min_s": round(st["min_ms"] / 1e3, 4), "steps_per_s": round(st["per_s"], 4)})
    row.update({k: v for k, v in c.info.items() if k != "blocks"})
    row["blocks"] = _blocks_label(c.info.get("blocks", []))
    if s.loss:
        row["loss_first"] = round(c.losses[0], 5)
        row["loss_last"] = round(c.losses[-1], 5)
    if base is not None:
        b = stats(base.step_s)["median_ms"] / 1e3
        row["step_vs_baseline"] = round(st["median_ms"] / 1e3 / b, 3)  # unrounded: the baseline is exactly 1
        row["trainable_vs_baseline"] = round(row["trainable_params"] / max(base.info["trainable_params"], 1), 4)
    return row


def _measure_memory(cases: list[TrainCase], rows: list[dict], s: TrainSettings, say) -> None:
    for c, row in zip(cases, rows):
        if c.skipped:
            continue
        say(f"peak memory: {c.name} (fresh process)", 0)
        res = run_isolated("peft_export.bench.train:measure_case_memory",
                           {"method": c.method, "placement": c.placement, "settings": s.to_dict()})
        if "error" in res:
            row["memory_error"] = res["error"]
        else:
            row["peak_memory_mib"] = round(res["peak_memory_mib"], 1)
            row["setup_memory_mib"] = round(res["setup_memory_mib"], 1)
            row["train_memory_mib"] = round(res["peak_memory_mib"] - res["setup_memory_mib"], 1)
        say(c.name, 1)


def measure_case_memory(method: str, placement: str, settings: dict) -> dict:
    """Peak memory of one case alone: set up, then warm-up + up to 2 steps (run in a fresh process).

    Also returns the timed steps' seconds (after the warm-up) and the case's parameter counts."""
    s = TrainSettings(**settings)
    scratch = Path(tempfile.mkdtemp(prefix="peft_export_bench_mem_"))
    try:
        runner = CaseRunner(method, placement, s, scratch)
        if runner.trainer.device.type == "cuda":
            runner._torch.cuda.reset_peak_memory_stats(runner.trainer.device)
        setup = runner.current_memory_mib()
        times = [runner.step()[0] for _ in range(s.warmup + min(s.steps, 2))][s.warmup:]
        peak = runner.peak_memory_mib()
        runner.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"peak_memory_mib": peak, "setup_memory_mib": setup, "step_s": times, "info": runner.info}


def _units(s: TrainSettings) -> int:
    return s.warmup + s.steps + (1 if s.memory else 0)


def work_units(methods: list[str], placements: list[str], s: TrainSettings) -> int:
    """Total progress units of a run: per case, one per step (warm-up included) and one for its memory run."""
    return len(methods) * len(placements) * _units(s)


def _blocks_label(blocks: list[int]) -> str:
    if not blocks:
        return "-"
    if len(blocks) > 3 and blocks == list(range(blocks[0], blocks[-1] + 1)):
        return f"{blocks[0]}-{blocks[-1]}"
    return ",".join(map(str, blocks))


def _pick_baseline(active: list[TrainCase], name: str | None) -> TrainCase | None:
    if not active:
        return None
    if name:
        for c in active:
            if c.name == name:
                return c
        for c in active:
            if name in c.name:
                return c
        raise UsageError(f"baseline {name!r} matches no case; cases: {', '.join(c.name for c in active)}")
    for c in active:
        if c.method == "lora" and c.placement == "all":
            return c
    return active[0]


def write_train_results(out_dir: Path, results: dict) -> list[Path]:
    j, c = write_results(out_dir, results, results["cases"])
    return [j, c, plot_train(out_dir / "train.png", results)]
