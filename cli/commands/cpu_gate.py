"""``peft-export cpu-gate``: gate reduced-precision OpenVINO runs (bf16, bf16-mixed, NNCF int8) of an export on
this CPU (torch-free; logic in :mod:`peft_export.export.cpu_gate`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from peft_export_cli import common


def _field(name: str):
    from peft_export.export.cpu_gate import CpuGateOptions

    return CpuGateOptions.model_fields[name]


def _opt(name: str, flag: str):
    f = _field(name)
    default = ",".join(f.default) if isinstance(f.default, tuple) else f.default
    return typer.Option(default, flag, help=f.description)


def register(app: typer.Typer) -> None:
    @app.command("cpu-gate")
    def cpu_gate_cmd(
        out_dir: Path = typer.Argument(..., help="fp32 export folder (from `peft-export export`)."),
        precisions: str = _opt("precisions", "--precisions"),
        iou: float = _opt("iou", "--iou"),
        calibration: str = _opt("calibration", "--calibration"),
        gate_images: int = _opt("gate_images", "--gate-images"),
        calibration_images: int = _opt("calibration_images", "--calibration-images"),
        rounds: int = _opt("rounds", "--rounds"),
        json_out: bool = typer.Option(False, "--json", help="Print the record as JSON on stdout."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    ):
        """Accept reduced-precision OpenVINO runs of an export on this CPU only where they reproduce fp32.

        For each precision: box AND point mean mask IoU of (candidate encoder + fp32 decoder) vs (fp32 encoder +
        the same decoder) on held-out images must reach --iou. Writes EXPORT/cpu_gate.json (keyed by the encoder's
        sha256); the OpenVINO backend's --inference-precision auto then runs the fastest passed option. Needs no
        PyTorch; needs OpenVINO (pip install 'peft-export\\[openvino]'; int8 also NNCF: 'peft-export\\[nncf]'). Example:

        [bold]peft-export cpu-gate lite_onnx/ --precisions bf16,bf16-mixed,int8[/]
        """
        from pydantic import ValidationError

        from peft_export.errors import UsageError
        from peft_export.export.cpu_gate import CpuGateOptions, run_cpu_gate

        try:
            opts = CpuGateOptions(precisions=tuple(common.parse_list(precisions)), iou=iou, calibration=calibration,
                                  gate_images=gate_images, calibration_images=calibration_images, rounds=rounds)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise UsageError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from None
        show = not (quiet or json_out)
        with common.progress_bar("CPU gate", None, enabled=show) as bar:
            record = run_cpu_gate(out_dir, opts, progress=lambda msg: bar.update(description=msg))
        if json_out:
            common.print_json(record)
            return
        cpu = record["cpu"]
        table = Table(title=f"CPU gate: {record['model']} on {cpu['model']} ({cpu['kind']}), threshold "
                            f"{record['threshold']}")
        for col in ("precision", "box IoU", "point IoU", "latency vs f32", "result"):
            table.add_column(col, justify="left" if col == "precision" else "right")
        for name, r in record["precisions"].items():
            ratio = f"x{r['latency_ratio']:.2f}" if "latency_ratio" in r else ""
            result = "[green]pass[/]" if r.get("passed") else f"[red]fail[/] {r.get('reason', '')}"
            table.add_row(name, f"{r['box_mean_iou']:.4f}" if "box_mean_iou" in r else "",
                          f"{r['point_mean_iou']:.4f}" if "point_mean_iou" in r else "", ratio, result)
        common.out.print(table)
        common.out.print(f"-> {out_dir / 'cpu_gate.json'}; run with [bold]--backend openvino[/] "
                         "(--inference-precision auto picks the fastest passed option)")
