"""``peft-export benchmark train|infer``: training cost vs placement; inference latency across backends."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from peft_export.errors import UsageError
from peft_export_cli import common

bench_app = typer.Typer(
    help="Measure training cost across PEFT placements/methods, and inference latency across backends.\n\n"
         "Every figure is measured in one run (cases alternate so machine drift hits all alike) and is also given "
         "as a ratio to a named baseline case. Results: RESULT_DIR/results.json, results.csv and PNG plots.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)


def _result_dir(path: Path, force: bool) -> Path:
    common.refuse_overwrite(path, force, "result folder")
    return path


def _table(title: str, rows: list[dict], columns: list[tuple[str, str]]) -> Table:
    table = Table(title=title)
    table.add_column("case", no_wrap=True)
    for _, header in columns:
        table.add_column(header, justify="right")
    for r in rows:
        if "skipped" in r:
            table.add_row(r["case"], "[dim]skipped[/]", *[""] * (len(columns) - 1))
            continue
        cells = []
        for key, _ in columns:
            v = r.get(key)
            cells.append("" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v))
        table.add_row(r["case"], *cells)
    return table


def _print_results(table: Table, rows: list[dict], files: list[Path]) -> None:
    common.out.print(table)
    for r in rows:
        if "skipped" in r:
            common.out.print(f"skipped {escape(r['case'])}: {escape(r['skipped'])}", highlight=False)
    common.out.print(f"wrote {', '.join(str(f) for f in files)}", highlight=False)


@bench_app.command("infer")
def infer_cmd(
    out_dirs: list[Path] = typer.Argument(..., help="Export folders (peft-export export / merge-and-export)."),
    output: Path = typer.Option(..., "--output", "-o", help="RESULT_DIR for results.json, results.csv, latency.png."),
    backends: str = typer.Option("torch,onnxruntime,tensorrt", help="Comma-separated: torch, onnxruntime, tensorrt."),
    precisions: str = typer.Option("fp32,fp16,int8", help="Comma-separated precisions to include."),
    runs: int = typer.Option(10, help="Timed runs per case (after warm-up)."),
    warmup: int = typer.Option(2, help="Untimed warm-up runs per case."),
    prompts: int = typer.Option(16, help="Prompts in the batched decoder measurement."),
    baseline: str = typer.Option(None, help="Case (name or part of it) the ratios refer to; default PyTorch vanilla."),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Peak RSS per case in a fresh process."),
    force: bool = typer.Option(False, "--force", help="Overwrite RESULT_DIR."),
    json_out: bool = typer.Option(False, "--json", help="Print results.json on stdout."),
):
    """Encoder and decoder latency (p50/p90/p99, throughput) and peak memory per backend and precision.

    For each export folder: ONNX Runtime (its precision), TensorRT (if engines were built and TensorRT + a GPU are
    here), and PyTorch eager from the checkpoint it came from — unmerged (PEFT modules), merged, and vanilla (no
    PEFT). Unavailable cases are listed as skipped with the reason.

    Example: [bold]peft-export benchmark infer export_fp32/ export_int8/ -o bench/ --runs 20[/]
    """
    from peft_export.bench.infer import BACKENDS, PRECISIONS, plan_cases, run_infer_benchmark, write_infer_results

    b = common.parse_list(backends, BACKENDS, "backend")
    p = common.parse_list(precisions, PRECISIONS, "precision")
    if runs < 1 or warmup < 0 or prompts < 1:
        raise UsageError("--runs and --prompts must be >= 1, --warmup >= 0")
    cases = plan_cases(out_dirs, b, p)  # unreadable export folders fail here, before anything is shown or written
    _result_dir(output, force)
    with common.progress_bar("benchmarking", warmup + runs, enabled=not json_out) as bar:
        results = run_infer_benchmark(out_dirs, backends=b, precisions=p, runs=runs, warmup=warmup, prompts=prompts,
                                      baseline=baseline, memory=memory, progress=bar.advance, cases=cases)
    files = write_infer_results(output, results)
    if json_out:
        common.print_json(results)
        return
    cols = [("encoder_median_ms", "encoder ms"), ("encoder_vs_baseline", "× base"),
            ("decoder_1_median_ms", "dec 1 ms"), (f"decoder_{prompts}_median_ms", f"dec {prompts} ms"),
            (f"decoder_{prompts}_vs_baseline", "× base"), ("mask_iou_vs_baseline", "mask IoU"),
            ("peak_rss_mib", "peak MiB")]
    _print_results(_table(f"inference (baseline: {results['settings']['baseline']})", results["cases"], cols),
                   results["cases"], files)


@bench_app.command("train")
def train_cmd(
    output: Path = typer.Option(..., "--output", "-o", help="RESULT_DIR for results.json, results.csv, train.png."),
    model: str = typer.Option("lite_medsam", help="Zoo model (vit_b, vit_l, vit_h, vit_t, lite_medsam, ...)."),
    methods: str = typer.Option("lora", help="Comma-separated PEFT methods (lora, fact, ssf, adaptformer, "
                                             "attention, bias, layernorm, late_ft, freeze_encoder, full)."),
    placements: str = typer.Option("all,late:50%,late:25%,late:1",
                                   help="Comma-separated block placements: all, late:N, late:P%, 6-11, 0,3,9."),
    checkpoint: Path = typer.Option(None, "--checkpoint", "-c", help="Weights for MODEL (default: the bundled "
                                    "ones; random weights where none are bundled — cost does not depend on values)."),
    rank: int = typer.Option(None, help="Rank for LoRA / FacT (default: the method's default, as in finetune)."),
    steps: int = typer.Option(5, help="Timed training steps per case (after warm-up)."),
    warmup: int = typer.Option(1, help="Untimed warm-up steps per case."),
    data: str = typer.Option("sample:dsb2018", help="Training data: sample:dsb2018 or a folder (images/ + labels/)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    batch_size: int = typer.Option(1, help="Images per step."),
    objects: int = typer.Option(4, "--objects", help="Objects prompted per image and step."),
    sub_iterations: int = typer.Option(1, help="Interactive correction rounds per step."),
    trunk_cache: bool = typer.Option(False, "--trunk-cache/--no-trunk-cache",
                                     help="Cache the frozen early blocks' output (finetune's default; off here so "
                                          "step times are the method's own)."),
    baseline: str = typer.Option(None, help="Case the ratios refer to (e.g. 'lora all', the default)."),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Peak memory per case in a fresh process."),
    force: bool = typer.Option(False, "--force", help="Overwrite RESULT_DIR."),
    json_out: bool = typer.Option(False, "--json", help="Print results.json on stdout."),
):
    """Training step time, peak memory and trainable parameters for each PEFT method × block placement.

    Reproduces the study's placement-vs-cost comparison on your hardware: every case runs the finetune recipe's
    real training step on the same data; steps alternate between cases; each case's peak memory is measured
    alone in a fresh process (CPU: peak RSS; CUDA: max allocated). Ratios are to LoRA on all blocks.

    Examples:
      [bold]peft-export benchmark train -o bench_train/[/]  (LiteMedSAM, LoRA, 4 placements)
      [bold]peft-export benchmark train --model vit_b --methods lora,ssf --placements all,late:1 --steps 3 -o b/[/]
    """
    from peft_export.bench.train import (
        TrainSettings,
        plan_cases,
        run_train_benchmark,
        work_units,
        write_train_results,
    )

    settings = TrainSettings(model=model, data=data, steps=steps, warmup=warmup, device=device,
                             batch_size=batch_size, objects_per_image=objects, sub_iterations=sub_iterations,
                             trunk_cache=trunk_cache, memory=memory, rank=rank,
                             checkpoint=str(checkpoint) if checkpoint else None)
    if checkpoint is not None and not checkpoint.is_file():
        raise UsageError(f"checkpoint not found: {checkpoint}")
    if rank is not None and rank < 1:
        raise UsageError("--rank must be >= 1")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda, got {device!r}")
    m = common.parse_list(methods, None, "method")
    p = common.parse_list(placements, None, "placement")
    if not m or not p:
        raise UsageError("--methods and --placements must each name at least one entry")
    cases = plan_cases(m, p, settings)  # bad names and options fail here, before anything is shown or written
    _result_dir(output, force)
    with common.progress_bar("benchmark train", work_units(m, p, settings), enabled=not json_out,
                             extra_fields="{task.fields[case]}", case="") as bar:
        results = run_train_benchmark(m, p, settings, baseline=baseline,
                                      progress=lambda text, n: bar.advance(n, case=text), cases=cases)
    files = write_train_results(output, results)
    if json_out:
        common.print_json(results)
        return
    cols = [("blocks", "blocks"), ("trainable_encoder_params", "enc. params"), ("step_median_s", "step s"),
            ("step_vs_baseline", "×"), ("peak_memory_mib", "peak MiB"), ("memory_vs_baseline", "×"),
            ("train_memory_mib", "train MiB"), ("train_memory_vs_baseline", "×")]
    title = (f"training, {model}, {results['settings']['memory_kind']} (baseline: {results['settings']['baseline']})")
    _print_results(_table(title, results["cases"], cols), results["cases"], files)


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="benchmark")
