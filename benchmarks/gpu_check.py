"""One-shot GPU check: every GPU-side figure of peft-export, in one JSON file, in under 8 minutes on one GPU.

    bash benchmarks/gpu_check.sh                              # -> gpu_check.json
    bash benchmarks/gpu_check.sh --out g.json --budget-s 420  # stop starting new parts after 420 s
    bash benchmarks/gpu_check.sh --cpu-dry-run --out x.json   # no GPU used: every part's skip path, the JSON

Needs only PyTorch (CUDA) + numpy + this project (its own dependencies). What a part needs beyond that is checked
first, and a part whose need is missing is skipped with the reason: pytest (the GPU tests), onnxruntime-gpu's CUDA
provider (ONNX Runtime part), TensorRT + cuda-python (engine part). Parts, in order:

1. ``tests``: ``pytest -m "gpu or tensorrt" tests/`` (the real TensorRT build/run tests), with a time limit.
2. ``train``: SAM vit_b (random weights; cost does not depend on their values) + LoRA, blocks ``all`` vs ``late:1``,
   in fp32, bf16 and fp16 autocast: median step time and CUDA peak memory (``benchmark train``'s code; memory per
   case in a fresh process).
3. ``encoder``: the PyTorch image encoder with LoRA on every block, unmerged vs merged, fp32 and bf16: median
   latency and the merged-vs-unmerged difference.
4. ``onnxruntime``: an export (LiteMedSAM; bundled or random weights) on ONNX Runtime's CUDA provider vs its CPU
   provider: latency and max |diff|.
5. ``tensorrt``: ``build-engine`` on that export (fp32), then TensorRT vs ONNX Runtime: latency and max |diff|.

The JSON is rewritten after every part, so a run stopped early keeps the parts it finished.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PARTS = ("tests", "train", "encoder", "onnxruntime", "tensorrt")


def importable_project(shim_dir: Path) -> None:
    """This checkout importable here and in child processes, installed or not (``cli/`` is ``peft_export_cli``)."""
    paths = [str(REPO)]
    if importlib.util.find_spec("peft_export_cli") is None:
        (shim_dir / "peft_export_cli").symlink_to(REPO / "cli", target_is_directory=True)
        paths.append(str(shim_dir))
    sys.path[:0] = paths
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])


class Skip(Exception):
    """A part cannot run here; the message says why."""


@dataclass
class Ctx:
    device: str  # "cuda", or "cpu" (dry run, or the CPU smoke test of the measuring code)
    dry_run: bool
    deadline: float  # time.monotonic() after which no new part starts
    work: Path
    model: str = "vit_b"
    steps: int = 5
    runs: int = 10
    memory: bool = True
    export_model: str = "lite_medsam"
    cache: dict = field(default_factory=dict)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


def _cuda_reason(ctx: Ctx) -> str | None:
    if ctx.dry_run:
        return "--cpu-dry-run: no GPU is used"
    import torch

    if not torch.cuda.is_available():
        return f"PyTorch sees no CUDA GPU (torch {torch.__version__}, CUDA build {torch.version.cuda})"
    return None


def _need_cuda(ctx: Ctx, *, cpu_ok: bool = False) -> None:
    reason = _cuda_reason(ctx)
    if reason and not (cpu_ok and ctx.device == "cpu" and not ctx.dry_run):
        raise Skip(reason)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _median_ms(fns: dict[str, Callable[[], object]], device: str, warmup: int, runs: int) -> dict[str, float]:
    """Median milliseconds of each function, timed round-robin (run 1 of each, then run 2, ...): drift hits all."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return {f"{k}_ms": round(sorted(t)[len(t) // 2] * 1e3, 3) for k, t in times.items()}


# ---- parts -----------------------------------------------------------------------------------------------------

def part_tests(ctx: Ctx) -> dict:
    if importlib.util.find_spec("pytest") is None:
        raise Skip("pytest is not installed (pip install pytest)")
    _need_cuda(ctx)
    limit = max(30.0, min(240.0, ctx.remaining() - 200))
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu or tensorrt", "tests/", "-q", "-rs", "-p", "no:cacheprovider"]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"pytest did not finish within {limit:.0f} s", "command": " ".join(cmd)}
    lines = proc.stdout.strip().splitlines()
    summary = next((ln for ln in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|error|deselected)", ln)),
                   lines[-1] if lines else "")
    return {"ok": proc.returncode in (0, 5), "returncode": proc.returncode, "summary": summary.strip("= "),
            "command": " ".join(cmd), "tail": "\n".join(lines[-25:])}


def _train_data(ctx: Ctx) -> str:
    """The bundled DSB2018 tiles, or (without the samples extra) a small synthetic folder of disks."""
    from peft_export.errors import PeftExportError

    try:
        from peft_export.data.dataset import load_samples

        load_samples("sample:dsb2018", "train")
        return "sample:dsb2018"
    except PeftExportError:
        pass
    import numpy as np
    import tifffile

    folder = ctx.work / "disks"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:256, :256]
    for split, n in (("train", 2), ("val", 1)):
        for sub in ("images", "labels"):
            (folder / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            labels = np.zeros((256, 256), np.uint16)
            for k, (cy, cx) in enumerate(rng.uniform(30, 226, (8, 2)), 1):
                labels[(yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(8, 20) ** 2] = k
            image = (labels > 0) * 150 + rng.normal(20, 5, labels.shape)
            tifffile.imwrite(folder / split / "images" / f"{i}.tif", image.clip(0, 255).astype(np.uint8))
            tifffile.imwrite(folder / split / "labels" / f"{i}.tif", labels)
    return str(folder)


def part_train(ctx: Ctx) -> dict:
    _need_cuda(ctx, cpu_ok=True)
    import torch

    from peft_export.bench.train import TrainSettings, run_train_benchmark

    precisions = ["fp32"]
    if ctx.device == "cuda":
        precisions += ["bf16", "fp16"] if torch.cuda.is_bf16_supported() else ["fp16"]
    data = _train_data(ctx)
    out = {"model": ctx.model, "data": data, "method": "lora", "steps": ctx.steps, "precisions": {}}
    for p in precisions:
        if ctx.remaining() < 60:
            out["precisions"][p] = {"skipped": "time budget spent"}
            continue
        settings = TrainSettings(model=ctx.model, data=data, steps=ctx.steps, warmup=1, device=ctx.device,
                                 precision=p, objects_per_image=4, memory=ctx.memory)
        res = run_train_benchmark(["lora"], ["all", "late:1"], settings)
        keys = ("step_median_s", "step_vs_baseline", "peak_memory_mib", "memory_vs_baseline", "train_memory_mib",
                "train_memory_vs_baseline", "trainable_encoder_params", "memory_error", "skipped")
        out["precisions"][p] = {r["case"]: {k: r[k] for k in keys if k in r} for r in res["cases"]}
        out["memory_kind"] = res["settings"]["memory_kind"]
    return out


def _lora_model(name: str, device: str):
    import torch

    from peft_export.models.registry import build_sam
    from peft_export.peft import PeftConfig, apply_peft

    torch.manual_seed(0)
    model = build_sam(name)
    for prm in model.parameters():
        prm.requires_grad_(False)
    apply_peft(model, PeftConfig("lora", "all", {}), name)
    with torch.no_grad():  # LoRA's B starts at zero: give the adapters values so that merging changes weights
        for prm in model.image_encoder.parameters():
            if prm.requires_grad:
                prm.add_(torch.randn_like(prm) * 0.02)
    return model.eval().to(device)


def part_encoder(ctx: Ctx) -> dict:
    _need_cuda(ctx, cpu_ok=True)
    import torch

    from peft_export.peft import merge_peft

    unmerged = _lora_model(ctx.model, ctx.device)
    merged = merge_peft(copy.deepcopy(unmerged))
    size = unmerged.image_encoder.img_size
    x = torch.randn(1, 3, size, size, device=ctx.device)
    out = {"model": ctx.model, "peft": "lora all blocks (perturbed adapters)", "input": [1, 3, size, size]}
    for p in ["fp32", *(["bf16"] if ctx.device == "cuda" else [])]:
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if p == "bf16" else torch.autocast("cpu", enabled=False)
        with torch.no_grad(), amp:
            ref, got = unmerged.image_encoder(x).float(), merged.image_encoder(x).float()
            figures = _median_ms({"unmerged": lambda: unmerged.image_encoder(x),
                                  "merged": lambda: merged.image_encoder(x)}, ctx.device, 3, ctx.runs)
        figures["merged_vs_unmerged"] = round(figures["merged_ms"] / figures["unmerged_ms"], 3)
        figures["max_abs_diff"] = float((ref - got).abs().max())
        figures["max_abs_reference"] = float(ref.abs().max())
        out[p] = figures
    if ctx.device == "cuda":
        out["peak_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _export(ctx: Ctx) -> Path:
    """One fp32 export for the ONNX Runtime and TensorRT parts (made once)."""
    if "export" not in ctx.cache:
        from peft_export.export import ExportOptions, export_model, prepare_for_export
        from peft_export.loading import load_model

        out = ctx.work / f"{ctx.export_model}_onnx"
        export_model(prepare_for_export(load_model(ctx.export_model, require_weights=False)), out, ExportOptions())
        ctx.cache["export"] = out
    return ctx.cache["export"]


def _backend_figures(backend, x, coords, labels, device: str, runs: int) -> tuple[dict, tuple]:
    emb = backend.embed(x)
    low, _ = backend.decode(emb, coords, labels)
    figures = _median_ms({"encoder": lambda: backend.embed(x), "decoder": lambda: backend.decode(emb, coords, labels)},
                         device, 2, runs)
    return figures, (emb, low)


def _sample_inputs(size: int):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 3, size, size)).astype(np.float32)
    coords = rng.uniform(0, size, (16, 2, 2)).astype(np.float32)
    return x, coords, np.tile(np.array([[2, 3]], np.float32), (16, 1))  # 16 box prompts


def _diff(a, b) -> float:
    import numpy as np

    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def part_onnxruntime(ctx: Ctx) -> dict:
    if importlib.util.find_spec("onnxruntime") is None:
        raise Skip("onnxruntime is not installed (pip install onnxruntime-gpu)")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise Skip(f"this onnxruntime ({ort.__version__}) has no CUDA provider (pip install onnxruntime-gpu; "
                   f"providers: {', '.join(ort.get_available_providers())})")
    _need_cuda(ctx)
    from peft_export.runtime.onnx_backend import OnnxBackend

    out_dir = _export(ctx)
    cuda = OnnxBackend(out_dir, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    if cuda.encoder.get_providers()[0] != "CUDAExecutionProvider":
        return {"ok": False, "error": f"the CUDA provider did not load (session: {cuda.encoder.get_providers()})"}
    cpu = OnnxBackend(out_dir, providers=["CPUExecutionProvider"])
    x, coords, labels = _sample_inputs(cuda.info.img_size)
    f_gpu, (emb_g, low_g) = _backend_figures(cuda, x, coords, labels, "cpu", ctx.runs)  # ORT returns host arrays
    f_cpu, (emb_c, low_c) = _backend_figures(cpu, x, coords, labels, "cpu", ctx.runs)
    ctx.cache["ort_cuda"] = (f_gpu, emb_g, low_g)
    return {"export": ctx.export_model, "cuda": f_gpu, "cpu": f_cpu, "prompts": len(coords),
            "encoder_cuda_vs_cpu": round(f_gpu["encoder_ms"] / f_cpu["encoder_ms"], 3),
            "max_abs_diff_embedding": _diff(emb_g, emb_c), "max_abs_diff_low_res_masks": _diff(low_g, low_c)}


def part_tensorrt(ctx: Ctx) -> dict:
    if importlib.util.find_spec("tensorrt") is None:
        raise Skip("TensorRT is not installed (pip install 'peft-export[tensorrt]')")
    if importlib.util.find_spec("cuda") is None:
        raise Skip("cuda-python is not installed (pip install 'peft-export[tensorrt]')")
    _need_cuda(ctx)
    import shutil

    from peft_export.export.tensorrt import EngineOptions, build_engines
    from peft_export.runtime.onnx_backend import OnnxBackend
    from peft_export.runtime.tensorrt_backend import TensorRTBackend

    out_dir = ctx.work / "trt_fp32"
    shutil.copytree(_export(ctx), out_dir)
    t0 = time.perf_counter()
    meta = build_engines(out_dir, EngineOptions(max_points=8))
    build_s = round(time.perf_counter() - t0, 1)
    trt = TensorRTBackend(out_dir)
    ort_b = OnnxBackend(out_dir)
    x, coords, labels = _sample_inputs(ort_b.info.img_size)
    f_trt, (emb_t, low_t) = _backend_figures(trt, x, coords, labels, "cpu", ctx.runs)
    f_ort, (emb_o, low_o) = _backend_figures(ort_b, x, coords, labels, "cpu", ctx.runs)
    trt.close()
    return {"tensorrt_version": meta.get("tensorrt_version"), "build_s": build_s, "verified": meta.get("verified"),
            "parity": meta.get("parity"), "tensorrt": f_trt, "onnxruntime": f_ort, "onnxruntime_providers":
            ort_b.info.details["providers"], "encoder_trt_vs_ort": round(f_trt["encoder_ms"] / f_ort["encoder_ms"], 3),
            "max_abs_diff_embedding": _diff(emb_t, emb_o), "max_abs_diff_low_res_masks": _diff(low_t, low_o)}


FUNCTIONS: dict[str, Callable[[Ctx], dict]] = {"tests": part_tests, "train": part_train, "encoder": part_encoder,
                                               "onnxruntime": part_onnxruntime, "tensorrt": part_tensorrt}


# ---- the run ---------------------------------------------------------------------------------------------------

def run_part(name: str, ctx: Ctx) -> dict:
    t0 = time.perf_counter()
    if ctx.remaining() <= 0:
        return {"status": "skipped", "reason": "time budget spent before this part (--budget-s)"}
    try:
        res = FUNCTIONS[name](ctx)
        status = "ok" if res.pop("ok", True) else "failed"
        res = {"status": status, **res}
    except Skip as exc:
        res = {"status": "skipped", "reason": str(exc)}
    except Exception as exc:  # a part's failure is a figure too: the others still run
        first = (str(exc).strip().splitlines() or [""])[0]
        res = {"status": "failed", "error": f"{type(exc).__name__}: {first}",
               "traceback": traceback.format_exc(limit=6)[-3000:]}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def environment() -> dict:
    import numpy
    import torch

    env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "numpy": numpy.__version__, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["capability"] = list(torch.cuda.get_device_capability(0))
    for dist in ("onnxruntime", "onnxruntime-gpu", "tensorrt", "cuda-python", "pytest", "peft-export"):
        try:
            from importlib.metadata import version

            env[dist] = version(dist)
        except Exception:
            pass
    try:
        from peft_export.bench.common import cpu_name

        env["cpu"] = cpu_name()
    except Exception:
        env["cpu"] = platform.processor()
    return env


def write(path: Path, report: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check.json", help="the JSON file to write")
    ap.add_argument("--budget-s", type=float, default=420, help="no part starts after this many seconds")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--cpu-dry-run", action="store_true", help="use no GPU: every part takes its skip path")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per case")
    ap.add_argument("--runs", type=int, default=10, help="timed runs per latency figure")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"unknown part {bad[0]!r}; choose from {', '.join(PARTS)}")
    out = Path(args.out)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="peft_export_gpu_check_") as work:
        importable_project(Path(work))
        ctx = Ctx(device="cpu" if args.cpu_dry_run else "cuda", dry_run=args.cpu_dry_run,
                  deadline=started + args.budget_s, work=Path(work), steps=args.steps, runs=args.runs)
        report = {"kind": "gpu_check", "version": 1, "dry_run": args.cpu_dry_run, "environment": environment(),
                  "budget_s": args.budget_s, "parts": {}}
        for name in parts:
            print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
            report["parts"][name] = run_part(name, ctx)
            report["seconds"] = round(time.monotonic() - started, 1)
            write(out, report)
            print(f"[gpu_check] {name}: {report['parts'][name]['status']}", file=sys.stderr, flush=True)
    print(f"[gpu_check] wrote {out} in {report['seconds']} s", file=sys.stderr)
    return 1 if any(p["status"] == "failed" for p in report["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
