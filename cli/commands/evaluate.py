"""``peft-export evaluate``: prompted segmentation quality against instance labels."""

from __future__ import annotations

import time

import typer
from peft_export_cli import common
from rich.table import Table

from peft_export.errors import UsageError

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but PyTorch sees no CUDA GPU")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}; choose auto, cpu or cuda")
    return device


def make_backend(model: str, checkpoint: str | None, backend: str, device: str):
    """A backend for evaluation, plus a description of what was loaded."""
    if backend != "torch":
        raise UsageError(f"--backend {backend} is not built yet (issue #8); use --backend torch")
    from peft_export.models.loading import load_model
    from peft_export.models.torch_backend import TorchBackend

    loaded = load_model(model, checkpoint)
    return TorchBackend(loaded.model, loaded.spec.preprocess, resolve_device(device),
                        multimask=loaded.spec.multimask), {
        "model": loaded.spec.name, "source": loaded.source, "peft": loaded.peft}


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate_cmd(
        model: str = typer.Argument("lite_medsam", help="Zoo model name, a checkpoint file, or an export folder."),
        checkpoint: str = typer.Option(None, "--checkpoint", "-c", help="Weights for a zoo MODEL."),
        data: str = typer.Option("sample:dsb2018", "--data", "-d",
                                 help="Folder with images/ + labels/, or sample:dsb2018 (bundled real data)."),
        split: str = typer.Option("val", help="train, val or all (sample data, or train/ val/ sub-folders)."),
        prompts: str = typer.Option("box,point", help="Comma-separated prompt types: box, point."),
        backend: str = typer.Option("torch", help="torch, onnxruntime or tensorrt."),
        device: str = typer.Option("auto", help="auto, cpu or cuda (torch backend)."),
        json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON on stdout."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    ):
        """Mean IoU and mSA of box / point prompts against instance labels.

        One prompt per ground-truth object (its bounding box, or its most interior point). Without arguments
        it evaluates the bundled LiteMedSAM weights on the held-out DSB2018 nuclei tiles.

        Example: [bold]peft-export evaluate lite_medsam --data sample:dsb2018 --split val --json[/]
        """
        from peft_export.data.dataset import load_samples
        from peft_export.runtime.evaluate import PROMPT_TYPES, evaluate

        kinds = common.parse_list(prompts, PROMPT_TYPES, "prompt type")
        if not kinds:
            raise UsageError("--prompts is empty; choose from box, point")
        if backend not in BACKENDS:
            raise UsageError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        samples = load_samples(data, split)
        be, desc = make_backend(model, checkpoint, backend, device)
        t0 = time.perf_counter()
        with common.progress_bar("evaluating", len(samples), enabled=not (quiet or json_out)) as bar:
            results = evaluate(be, samples, kinds, progress=bar.advance)
        report = {**desc, "backend": backend, "data": data, "split": split, "images": len(samples),
                  "results": results, "seconds": round(time.perf_counter() - t0, 2)}
        if json_out:
            common.print_json(report)
            return
        table = Table(title=f"{desc['model']} on {data} ({split}, {len(samples)} images, backend {backend})")
        for col in ("prompt", "mean IoU", "mSA", "objects"):
            table.add_column(col, justify="right" if col != "prompt" else "left")
        for kind, r in results.items():
            table.add_row(kind, f"{r['mean_iou']:.3f}", f"{r['msa']:.3f}", str(r["objects"]))
        common.out.print(table)
