"""``peft-export cpu-gate``: gate reduced-precision OpenVINO runs (bf16, bf16-mixed, NNCF int8) of an export on
this CPU (torch-free; logic in :mod:`peft_export.export.cpu_gate`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from peft_export.export.options import CpuGateOptions
from peft_export_cli import common
from peft_export_cli.options import with_options


def register(app: typer.Typer) -> None:
    @app.command("cpu-gate")
    @with_options(gate=CpuGateOptions)
    def cpu_gate_cmd(
        export: Path = typer.Argument(..., metavar="EXPORT", help="fp32 export folder (from `peft-export export`)."),
        json_out: bool = typer.Option(False, "--json", help="Print the record as JSON on stdout."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
        *, gate: CpuGateOptions,
    ):
        """Accept reduced-precision OpenVINO runs of an export on this CPU only where they reproduce fp32.

        For each precision: box AND point mean mask IoU of (candidate encoder + fp32 decoder) vs (fp32 encoder +
        the same decoder) on held-out images must reach --iou. Writes EXPORT/cpu_gate.json (keyed by the encoder's
        sha256); the OpenVINO backend's --inference-precision auto then runs the fastest passed option. Needs no
        PyTorch; needs OpenVINO (pip install 'peft-export\\[openvino]'; int8 also NNCF: 'peft-export\\[nncf]'). Example:

        [bold]peft-export cpu-gate lite_onnx/ --precisions bf16,bf16-mixed,int8[/]
        """
        from peft_export.export.cpu_gate import run_cpu_gate

        show = not (quiet or json_out)
        with common.progress_bar("CPU gate", None, enabled=show) as bar:
            record = run_cpu_gate(export, gate, progress=lambda msg: bar.update(description=msg))
        if json_out:
            common.print_json(record)
            return
        cpu = record["cpu"]
        table = Table(title=f"CPU gate: {record['model']} on {cpu['model']} ({cpu['kind']}), threshold "
                            f"{record['threshold']}")
        instance = any("instance_matched_iou" in r for r in record["precisions"].values())
        cols = ("precision", "box IoU", "point IoU", *(("instance IoU",) if instance else ()), "latency vs f32",
                "result")
        for col in cols:
            table.add_column(col, justify="left" if col == "precision" else "right")
        for name, r in record["precisions"].items():
            ratio = f"x{r['latency_ratio']:.2f}" if "latency_ratio" in r else ""
            result = ("[green]pass[/]" if r.get("passed") else f"[yellow]skipped[/] {r['reason']}"
                      if r.get("skipped") else f"[red]fail[/] {r.get('reason', '')}")
            figures = [f"{r[k]:.4f}" if k in r else "" for k in ("box_mean_iou", "point_mean_iou",
                                                                   *(("instance_matched_iou",) if instance else ()))]
            table.add_row(name, *figures, ratio, result)
        common.out.print(table)
        common.out.print(f"-> {export / 'cpu_gate.json'}; run with [bold]--backend openvino[/] "
                         "(--inference-precision auto picks the fastest passed option)")
