"""Inference benchmark: encoder and decoder latency of export folders across backends and precisions.

For every export folder (OUT_DIR) the cases are:
- ``onnxruntime``: the exported graphs (precision from the manifest; merged, or with adapters kept);
- ``tensorrt``: its engines, when ``build-engine`` made them and TensorRT + a GPU are present;
- ``torch`` (PyTorch eager, fp32) from the checkpoint the export came from: ``unmerged`` (PEFT modules in
  place) and ``merged`` (folded), and ``vanilla`` — the same architecture without PEFT (bundled weights for
  LiteMedSAM; latency does not depend on weight values, so other models use random weights).
Unavailable cases are listed as skipped, with the reason.

All cases are timed round-robin (run 1 of every case, then run 2, …) so machine drift hits them alike; every
figure is also given as a ratio to a named baseline case from the same run. Masks of reduced-precision and
unmerged cases are compared with the baseline's (mask IoU on the sample prompts). Peak memory is measured per
case in a fresh process (peak RSS on CPU).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from peft_export.bench.common import machine_info, peak_rss_mib, run_isolated, stats, write_results
from peft_export.bench.plots import plot_infer
from peft_export.errors import PeftExportError, UsageError
from peft_export.manifest import read_manifest
from peft_export.prompts import box_prompts
from peft_export.runtime.backend import prepare_input
from peft_export.runtime.backends import BACKENDS as RUNTIME_BACKENDS
from peft_export.runtime.backends import RuntimeOptions, backend_class, open_model

BACKENDS = ("torch", *RUNTIME_BACKENDS)
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class Case:
    name: str
    backend: str
    precision: str
    variant: str  # merged | unmerged | vanilla | adapters
    out_dir: str
    model: str
    peft: str
    opener: Callable[[], Any] | None = None
    skipped: str | None = None
    timings: dict[str, list[float]] = field(default_factory=dict)

    def row(self) -> dict:
        return {"case": self.name, "backend": self.backend, "precision": self.precision, "variant": self.variant,
                "model": self.model, "peft": self.peft, "out_dir": self.out_dir}


def _peft_label(peft: dict | None) -> str:
    if not peft:
        return "none"
    return f"{peft.get('method')} {peft.get('placement', '')}".strip()


def _torch_cases(out_dir: Path, manifest, seen: set) -> list[Case]:
    """PyTorch eager: unmerged / merged from the export's source checkpoint, and vanilla."""
    model_name, peft = manifest.model, manifest.source.get("peft")
    ckpt = manifest.source.get("checkpoint")
    cases = []

    def loader(kind: str):
        def _open():
            # lazy: pulls segment_anything, torch, torchvision
            from peft_export.loading import default_weights, load_model
            from peft_export.models import build_sam, get_spec  # lazy: pulls segment_anything, torch, torchvision

            # lazy: pulls segment_anything, torch, torchvision
            from peft_export.models.torch_backend import TorchBackend
            from peft_export.peft import is_mergeable, merge_peft  # lazy: pulls torch

            spec = get_spec(model_name)
            if kind == "vanilla":
                weights = default_weights(model_name)
                model = build_sam(model_name, weights)
            else:
                model = load_model(ckpt).model
                if kind == "merged" and is_mergeable(model):
                    model = merge_peft(copy.deepcopy(model))
            return TorchBackend(model.eval(), spec.preprocess, multimask=spec.multimask)
        return _open

    has_ckpt = bool(ckpt) and Path(ckpt).exists()
    if peft:
        for kind in ("unmerged", "merged"):
            c = Case(f"torch {kind} ({model_name}, {_peft_label(peft)})", "torch", "fp32", kind, str(out_dir),
                     model_name, _peft_label(peft), loader(kind) if has_ckpt else None)
            if not has_ckpt:
                c.skipped = f"source checkpoint of {out_dir.name} not found ({ckpt})"
            cases.append(c)
    if ("vanilla", model_name) not in seen:
        seen.add(("vanilla", model_name))
        cases.append(Case(f"torch vanilla ({model_name})", "torch", "fp32", "vanilla", str(out_dir), model_name,
                          "none", loader("vanilla")))
    return cases


def _runtime_case(out_dir: Path, manifest, backend: str) -> Case:
    peft = manifest.source.get("peft")
    variant = "vanilla" if not peft else ("merged" if manifest.source.get("merged", True) else "adapters")
    name = f"{backend} {manifest.precision} {variant} ({manifest.model}, {_peft_label(peft)})"
    case = Case(name, backend, manifest.precision, variant, str(out_dir), manifest.model, _peft_label(peft))
    case.skipped = backend_class(backend).unavailable(out_dir, manifest)  # None: it can run here
    case.opener = lambda: open_model(out_dir, RuntimeOptions(backend=backend))
    return case


def plan_cases(out_dirs: list[str | Path], backends: list[str], precisions: list[str]) -> list[Case]:
    cases: list[Case] = []
    seen: set = set()
    for d in out_dirs:
        d = Path(d)
        manifest = read_manifest(d)
        prec_ok = manifest.precision in precisions
        for backend in backends:
            if backend == "torch":
                if manifest.precision == "fp32":
                    cases.extend(_torch_cases(d, manifest, seen))
                continue
            case = _runtime_case(d, manifest, backend)
            if not prec_ok:
                case.skipped = f"precision {manifest.precision} not asked for (--precisions)"
            cases.append(case)
    if not cases:
        raise UsageError("nothing to benchmark: check --backends / --precisions against the export folders")
    return cases


def _sample(backend, n_prompts: int):
    """The sample image (real DSB2018 val tile when installed) prepared for ``backend``, and box prompts."""
    try:
        from peft_export.data.dataset import dsb2018_tiles

        image = dsb2018_tiles("val")[0].image
    except PeftExportError:
        image = np.random.default_rng(0).integers(0, 255, (256, 256), dtype=np.uint8)
    x, prep = prepare_input(backend, image)
    rng = np.random.default_rng(1)
    h, w = prep.original_hw
    x0 = rng.uniform(0, w * 0.7, n_prompts)
    y0 = rng.uniform(0, h * 0.7, n_prompts)
    boxes = np.stack([x0, y0, x0 + rng.uniform(8, w * 0.3, n_prompts), y0 + rng.uniform(8, h * 0.3, n_prompts)], 1)
    coords, labels = box_prompts(prep.transform_boxes(boxes.astype(np.float32)))
    return x, prep, coords, labels


def run_infer_benchmark(out_dirs: list[str | Path], *, backends: list[str], precisions: list[str], runs: int = 10,
                        warmup: int = 2, prompts: int = 16, baseline: str | None = None, memory: bool = True,
                        progress: Callable[[int], None] | None = None, cases: list[Case] | None = None) -> dict:
    """Time every available case round-robin; returns the results dict (also see write_infer_results).

    ``cases``: from :func:`plan_cases` when the caller planned them already (each plan reads and hashes the exports).
    """
    cases = cases if cases is not None else plan_cases(out_dirs, backends, precisions)
    opened = _open_cases(cases)
    active = [c for c in cases if c.skipped is None]
    masks = _time_round_robin(active, opened, runs, warmup, prompts, progress)
    base = _pick_baseline(active, baseline)
    rows = [_result_row(c, base, masks) for c in cases]
    if memory:
        for row, c in zip(rows, cases):
            if c.skipped is None:
                res = run_isolated("peft_export.bench.infer:measure_case_memory", {"row": c.row(), "prompts": prompts})
                row["peak_rss_mib"] = res.get("peak_rss_mib")
                if "error" in res:
                    row["memory_error"] = res["error"]
    return {"kind": "infer", "machine": machine_info(),
            "settings": {"runs": runs, "warmup": warmup, "prompts": prompts, "backends": backends,
                         "precisions": precisions, "baseline": base.name if base else None,
                         "order": "round-robin over cases per run"},
            "cases": rows}


def _open_cases(cases: list[Case]) -> dict[str, Any]:
    """Open every planned case; one that fails to open is skipped with the reason."""
    opened: dict[str, Any] = {}
    for c in cases:
        if c.skipped is None:
            try:
                opened[c.name] = c.opener()
            except PeftExportError as exc:
                c.skipped = f"could not open: {exc}"
    return opened


def _time_round_robin(active: list[Case], opened: dict[str, Any], runs: int, warmup: int, prompts: int,
                      progress: Callable[[int], None] | None) -> dict[str, np.ndarray]:
    """Encoder, 1-prompt and N-prompt decoder timings, one call per case per round; the first round's masks."""
    samples = {c.name: _sample(opened[c.name], prompts) for c in active}
    for c in active:
        c.timings = {"encoder": [], "decoder_1": [], f"decoder_{prompts}": []}
    masks: dict[str, np.ndarray] = {}
    for r in range(warmup + runs):
        for c in active:
            be = opened[c.name]
            x, _, coords, labels = samples[c.name]
            t0 = time.perf_counter()
            emb = be.embed(x)
            t1 = time.perf_counter()
            be.decode(emb, coords[:1], labels[:1])
            t2 = time.perf_counter()
            low, _ = be.decode(emb, coords, labels)
            t3 = time.perf_counter()
            if r >= warmup:
                c.timings["encoder"].append(t1 - t0)
                c.timings["decoder_1"].append(t2 - t1)
                c.timings[f"decoder_{prompts}"].append(t3 - t2)
            if r == 0:
                masks[c.name] = low[:, 0] > 0
        if progress is not None:
            progress(1)
    return masks


def _result_row(c: Case, base: Case | None, masks: dict[str, np.ndarray]) -> dict:
    row = c.row()
    if c.skipped:
        row["skipped"] = c.skipped
        return row
    for part, t in c.timings.items():
        s = stats(t)
        row[f"{part}_median_ms"] = round(s["median_ms"], 3)
        row[f"{part}_p90_ms"] = round(s["p90_ms"], 3)
        row[f"{part}_p99_ms"] = round(s["p99_ms"], 3)
        row[f"{part}_per_s"] = round(s["per_s"], 3)
        if base is not None:
            row[f"{part}_vs_baseline"] = round(s["median_ms"] / stats(base.timings[part])["median_ms"], 3)
    if base is not None:
        row["mask_iou_vs_baseline"] = round(_mean_mask_iou(masks[c.name], masks[base.name]), 4)
    return row


def _pick_baseline(active: list[Case], name: str | None) -> Case | None:
    if not active:
        return None
    if name:
        for c in active:
            if c.name == name or name in c.name:
                return c
        raise UsageError(f"baseline {name!r} matches no case; cases: {', '.join(c.name for c in active)}")
    for c in active:  # default: PyTorch vanilla, else the first case
        if c.backend == "torch" and c.variant == "vanilla":
            return c
    return active[0]


def _mean_mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = (a & b).reshape(len(a), -1).sum(1)
    union = (a | b).reshape(len(a), -1).sum(1)
    return float(np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0)))


def open_case(row: dict):
    """Re-open a case from its row (used by the isolated memory worker)."""
    d = Path(row["out_dir"])
    manifest = read_manifest(d)
    if row["backend"] == "torch":
        for c in _torch_cases(d, manifest, set()):
            if c.variant == row["variant"]:
                return c.opener()
        raise UsageError(f"case {row['case']} not found")
    return _runtime_case(d, manifest, row["backend"]).opener()


def measure_case_memory(row: dict, prompts: int) -> dict:
    be = open_case(row)
    x, _, coords, labels = _sample(be, prompts)
    for _ in range(2):
        emb = be.embed(x)
        be.decode(emb, coords, labels)
    return {"peak_rss_mib": round(peak_rss_mib(), 1)}


def write_infer_results(out_dir: Path, results: dict) -> list[Path]:
    j, c = write_results(out_dir, results, results["cases"])
    return [j, c, plot_infer(out_dir / "latency.png", results)]
