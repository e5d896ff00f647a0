"""``peft-export build-engine``: TensorRT engines from an export folder, checked against ONNX Runtime."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer
from rich.table import Table

from peft_export.export.tensorrt.options import EngineOptions
from peft_export_cli import common
from peft_export_cli.options import with_options


def register(app: typer.Typer) -> None:
    @app.command("build-engine")
    @with_options(engine=EngineOptions)
    def build_engine_cmd(
        export: Path = typer.Argument(..., metavar="EXPORT", help="Export folder made by `peft-export export` "
                                      "(manifest.json, encoder.onnx, decoder_lowres.onnx)."),
        print_trtexec: bool = typer.Option(False, "--print-trtexec", help="Only print the equivalent trtexec "
                                           "commands (needs no TensorRT and no GPU; writes nothing)."),
        force: bool = typer.Option(False, "--force", help="Replace existing engines."),
        json_out: bool = typer.Option(False, "--json", help="Print engine.json (or the trtexec commands) as JSON."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or messages."),
        *, engine: EngineOptions,
    ):
        """Build TensorRT engines (encoder.engine, decoder.engine + engine.json) next to the ONNX files.

        Engines are specific to the GPU model and TensorRT version they are built with: build them on the
        microscope's machine. After building, both engines run on a sample image (prompts at the profile's
        min/opt/max points and maximum batch) and are compared with ONNX Runtime on the same ONNX files (fp32:
        max |diff|; fp16/int8: mask IoU); a failure writes nothing. The equivalent trtexec lines are printed
        and stored in engine.json.

        Precision: the export's own precision builds strongly typed (TensorRT 10 and 11). fp16 from an fp32
        export uses TensorRT 10's --fp16 flag; TensorRT 11 removed it: export with [bold]peft-export export ...
        --precision fp16[/] first. int8 needs an encoder with symmetric int8 Q/DQ nodes (asymmetric or uint8 Q/DQ
        and ONNX Runtime's dynamic quantization are refused); the export's float32 decoder builds in fp32.

        The decoder takes --min-points to --max-points points per prompt (a point prompt counts its padding
        point, a box 2); the runtime splits batches larger than --max-batch. Needs TensorRT and cuda-python
        ([bold]pip install 'peft-export\\[tensorrt]'[/]) and an NVIDIA GPU; without them [bold]--print-trtexec[/]
        prints the trtexec commands to build by hand.

        Example: [bold]peft-export build-engine exported/ --precision fp16 --max-points 8 --timing-cache
        ~/.cache/trt.cache[/]
        """
        if print_trtexec:
            _print_trtexec(export, engine, json_out)
        else:
            _build(export, engine, force=force, json_out=json_out, quiet=quiet)


def _print_trtexec(out_dir: Path, opts, json_out: bool) -> None:
    from peft_export.export.tensorrt import installed_capabilities, plan_engines

    plan = plan_engines(out_dir, opts, capabilities=installed_capabilities())
    if json_out:
        common.print_json({"precision": plan.precision, "notes": plan.notes,
                           "trtexec": {r: shlex.join(a) for r, a in plan.trtexec().items()},
                           "profiles": {r: e.profile for r, e in plan.engines.items()}})
    else:
        common.out.print(plan.trtexec_text(), highlight=False, markup=False, soft_wrap=True)


def _build(out_dir: Path, opts, *, force: bool, json_out: bool, quiet: bool) -> None:
    from peft_export.export.tensorrt import build_engines, preflight

    show = not (quiet or json_out)
    prepared = preflight(out_dir, opts, force=force)  # missing TensorRT/GPU, bad options: before any output
    with common.progress_bar("build-engine", len(prepared.plan.steps), enabled=show) as bar:

        def step(name: str, done: int, total: int) -> None:  # the library names its steps and counts them
            bar.update(description=name, completed=done, total=total)

        def say(msg: str) -> None:
            common.info(msg, quiet=not show)

        meta = build_engines(out_dir, opts, force=force, progress=step, info=say, prepared=prepared)
    if json_out:
        common.print_json(meta)
        return
    _report(meta, out_dir)


def _report(meta: dict, out_dir: Path) -> None:
    parity = meta["parity"]
    if not parity.get("skipped"):
        table = Table(title=f"TensorRT vs ONNX Runtime ({parity['sample']}); gate: {parity['gate']}")
        for col in ("prompts", "batch", "points", "masks max |diff|", "mask IoU"):
            table.add_column(col, justify="left" if col == "prompts" else "right")
        table.add_row("image embedding", "", "", f"{parity['embedding_max_abs_diff']:.2e}",
                      f"cos {parity['embedding_cosine']:.6f}")
        for name, f in parity["prompt_sets"].items():
            table.add_row(name, str(f["batch"]), str(f["points"]), f"{f['masks_max_abs_diff']:.2e}",
                          f"{f['mask_iou']:.4f}")
        common.out.print(table)
    else:
        common.warn("not compared with ONNX Runtime (--no-verify); engine.json records the engines as unverified")
    for e in meta["engines"].values():
        common.out.print(f"{e['path']}: {e.get('precision', meta['precision'])}, {e['bytes'] / 2**20:.1f} MiB, "
                         f"built in {e['build_seconds']:.1f} s")
    common.out.print(f"[green]built[/] {meta['precision']} TensorRT {meta['tensorrt_version']} engines for "
                     f"{meta['gpu']['name']} (compute {meta['gpu']['compute_capability']}; {meta['build_mode']}) "
                     f"-> {out_dir}")
