"""``peft-export evaluate``: prompted segmentation quality against instance labels."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from peft_export.errors import UsageError
from peft_export_cli import common

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but PyTorch sees no CUDA GPU")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}; choose auto, cpu or cuda")
    return device


def is_export_folder(model: str) -> bool:
    from peft_export.manifest import MANIFEST_NAME

    p = Path(model)
    return p.is_dir() and ((p / MANIFEST_NAME).exists() or any(p.glob("*.onnx")))


def make_backend(model: str, checkpoint: str | None, backend: str, device: str):
    """A backend for evaluation (torch for checkpoints / zoo names, a runtime for export folders)."""
    export = is_export_folder(model)
    if backend == "auto":
        backend = "onnxruntime" if export else "torch"
    if export:
        if backend == "torch":
            raise UsageError(f"{model} is an export folder: evaluate it with --backend onnxruntime or tensorrt")
        if checkpoint is not None:
            raise UsageError("--checkpoint does not apply to an export folder")
        from peft_export.runtime.segmenter import open_backend

        be = open_backend(model, backend)
        m = be.manifest
        return be, {"model": m.model, "source": str(model), "peft": m.source.get("peft"), "backend": backend,
                    "precision": m.precision}
    if backend != "torch":
        raise UsageError(f"--backend {backend} runs export folders; export {model} first "
                         "(peft-export export / merge-and-export) or use --backend torch")
    from peft_export.models.loading import load_model
    from peft_export.models.torch_backend import TorchBackend

    loaded = load_model(model, checkpoint)
    be = TorchBackend(loaded.model, loaded.spec.preprocess, resolve_device(device), multimask=loaded.spec.multimask)
    return be, {"model": loaded.spec.name, "source": loaded.source, "peft": loaded.peft, "backend": "torch",
                "precision": "fp32"}


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate_cmd(
        model: str = typer.Argument("lite_medsam", help="Zoo model name, a checkpoint file, or an export folder."),
        checkpoint: str = typer.Option(None, "--checkpoint", "-c", help="Weights for a zoo MODEL."),
        data: str = typer.Option("sample:dsb2018", "--data", "-d",
                                 help="Folder with images/ + labels/, or sample:dsb2018 (bundled real data)."),
        split: str = typer.Option("val", help="train, val or all (sample data, or train/ val/ sub-folders)."),
        prompts: str = typer.Option("box,point", help="Comma-separated prompt types: box, point, auto."),
        backend: str = typer.Option("auto", help="auto (torch for checkpoints, onnxruntime for export folders), "
                                    "torch, onnxruntime or tensorrt."),
        device: str = typer.Option("auto", help="auto, cpu or cuda (torch backend)."),
        json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON on stdout."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    ):
        """Mean IoU and mSA of box / point / automatic prompts against instance labels.

        box / point: one prompt per ground-truth object (its bounding box, or its most interior point).
        auto: segment everything (grid of points), then match instances; mean IoU is each true object's best IoU.
        mSA is the mean segmentation accuracy over IoU thresholds 0.5…0.95. Without arguments it evaluates the
        bundled LiteMedSAM weights on the held-out DSB2018 nuclei tile.

        MODEL is a zoo name (+ --checkpoint), a checkpoint file (PyTorch), or an export folder (ONNX Runtime /
        TensorRT; no PyTorch needed). Examples:

        [bold]peft-export evaluate lite_medsam --data sample:dsb2018 --split val --json[/]

        [bold]peft-export evaluate runs/lora/best.pt[/]      [bold]peft-export evaluate export/ --prompts box,auto[/]
        """
        from peft_export.data.dataset import load_samples
        from peft_export.runtime.evaluate import ALL_PROMPT_TYPES, evaluate

        kinds = common.parse_list(prompts, ALL_PROMPT_TYPES, "prompt type")
        if not kinds:
            raise UsageError("--prompts is empty; choose from box, point, auto")
        if backend not in BACKENDS:
            raise UsageError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        samples = load_samples(data, split)
        be, desc = make_backend(model, checkpoint, backend, device)
        t0 = time.perf_counter()
        with common.progress_bar("evaluating", len(samples), enabled=not (quiet or json_out)) as bar:
            results = evaluate(be, samples, kinds, progress=bar.advance)
        report = {**desc, "data": data, "split": split, "images": len(samples),
                  "results": results, "seconds": round(time.perf_counter() - t0, 2)}
        if json_out:
            common.print_json(report)
            return
        table = Table(title=f"{desc['model']} on {data} ({split}, {len(samples)} images, {desc['backend']}, "
                            f"{desc['precision']})")
        for col in ("prompt", "mean IoU", "mSA", "objects"):
            table.add_column(col, justify="right" if col != "prompt" else "left")
        for kind, r in results.items():
            table.add_row(kind, f"{r['mean_iou']:.3f}", f"{r['msa']:.3f}", str(r["objects"]))
        common.out.print(table)
