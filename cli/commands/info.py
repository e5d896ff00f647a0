"""``peft-export info``: versions, devices, and where the bundled sample weights and data are."""

from __future__ import annotations

import importlib.metadata as md
import platform

import typer
from rich.markup import escape
from rich.table import Table

from peft_export import __version__
from peft_export.data.samples import sample_status
from peft_export.errors import first_line
from peft_export.runtime.cpu import cpu_features
from peft_export_cli import common


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def collect() -> dict:
    """Everything ``info`` reports, as a JSON-able dict."""
    data: dict = {"peft_export": __version__, "python": platform.python_version(),
                  "platform": f"{platform.system()} {platform.machine()}"}
    versions = {}
    for dist in ("torch", "torchvision", "segment-anything", "onnx", "onnxscript", "onnxruntime",
                 "onnxruntime-gpu", "openvino", "nncf", "tensorrt", "numpy"):
        versions[dist] = _version(dist)
    data["versions"] = versions
    devices: dict = {}
    try:
        import torch

        devices["torch_cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
            if torch.cuda.is_available() else []
        devices["cpu_threads"] = torch.get_num_threads()
    except Exception as exc:  # report, do not fail
        devices["torch_error"] = first_line(exc)
    try:
        import onnxruntime as ort

        devices["onnxruntime_providers"] = ort.get_available_providers()
    except Exception as exc:
        devices["onnxruntime_error"] = first_line(exc)
    try:
        import tensorrt  # noqa: F401

        devices["tensorrt_runtime"] = "importable"
    except Exception:
        devices["tensorrt_runtime"] = "not installed (pip install 'peft-export[tensorrt]'; needs an NVIDIA GPU)"
    devices["cpu"] = cpu_features()  # model, bf16/int8 flags, kind (the CPU section of the README)
    data["devices"] = devices
    data["samples"] = sample_status()
    return data


def register(app: typer.Typer) -> None:
    @app.command("info")
    def info_cmd(json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON.")):
        """Versions of torch / ONNX Runtime / TensorRT, devices found, and where the sample weights and data are."""
        data = collect()
        if json_out:
            common.print_json(data)
            return
        table = Table(title=f"peft-export {data['peft_export']}", show_header=False)
        table.add_column(style="bold")
        table.add_column()
        table.add_row("python", f"{data['python']} ({data['platform']})")
        for k, v in data["versions"].items():
            table.add_row(k, v or "[dim]not installed[/]")
        for k, v in data["devices"].items():
            table.add_row(k, escape((", ".join(v) or "none") if isinstance(v, list) else str(v)))
        for k, v in data["samples"].items():
            table.add_row(k, escape(v))
        common.out.print(table)
