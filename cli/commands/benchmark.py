"""``peft-export benchmark train|infer``: training cost vs placement; inference latency across backends."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from peft_export.bench.options import InferSettings, StudySettings, TrainSettings
from peft_export.errors import PeftExportError, UsageError
from peft_export_cli import common
from peft_export_cli.options import with_options

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


def _refuse_empty(rows: list[dict], output: Path) -> None:
    """A run that measured nothing fails (exit 1) with the reasons; its results files stay as a record."""
    from peft_export.bench.common import nothing_measured

    reason = nothing_measured(rows)
    if reason:
        raise PeftExportError(f"{reason}; the record is in {output}")


def _print_results(table: Table, rows: list[dict], files: list[Path]) -> None:
    common.out.print(table)
    for r in rows:
        if "skipped" in r:
            common.out.print(f"skipped {escape(r['case'])}: {escape(r['skipped'])}", highlight=False)
    common.out.print(f"wrote {', '.join(str(f) for f in files)}", highlight=False)


@bench_app.command("infer")
@with_options(bench=InferSettings)
def infer_cmd(
    exports: list[Path] = typer.Argument(..., metavar="EXPORT...", help="Export folders (peft-export export / "
                                         "merge-and-export)."),
    output: Path = typer.Option(..., "--output", "-o", help="RESULT_DIR for results.json, results.csv, latency.png."),
    force: bool = typer.Option(False, "--force", help="Overwrite RESULT_DIR."),
    json_out: bool = typer.Option(False, "--json", help="Print results.json on stdout."),
    *, bench: InferSettings,
):
    """Encoder and decoder latency (p50/p90/p99, throughput) and peak memory per backend and precision.

    For each export folder: ONNX Runtime (its precision), TensorRT (if engines were built and TensorRT + a GPU are
    here), and PyTorch eager from the checkpoint it came from — unmerged (PEFT modules), merged, and vanilla (no
    PEFT). Unavailable cases are listed as skipped with the reason.

    Example: [bold]peft-export benchmark infer export_fp32/ export_int8/ -o bench/ --runs 20[/]
    """
    from peft_export.bench.infer import plan_cases, run_infer_benchmark, write_infer_results

    b, p, prompts = bench.backends, bench.precisions, bench.prompts
    cases = plan_cases(exports, b, p)  # unreadable export folders fail here, before anything is shown or written
    _result_dir(output, force)
    with common.progress_bar("benchmarking", bench.warmup + bench.runs, enabled=not json_out) as bar:
        results = run_infer_benchmark(exports, backends=b, precisions=p, runs=bench.runs, warmup=bench.warmup,
                                      prompts=prompts, baseline=bench.baseline, memory=bench.memory,
                                      progress=bar.advance, cases=cases)
    files = write_infer_results(output, results)
    if json_out:
        common.print_json(results)
        _refuse_empty(results["cases"], output)
        return
    cols = [("encoder_median_ms", "encoder ms"), ("encoder_vs_baseline", "× base"),
            ("decoder_1_median_ms", "dec 1 ms"), (f"decoder_{prompts}_median_ms", f"dec {prompts} ms"),
            (f"decoder_{prompts}_vs_baseline", "× base"), ("mask_iou_vs_baseline", "mask IoU"),
            ("peak_rss_mib", "peak MiB")]
    _print_results(_table(f"inference (baseline: {results['settings']['baseline']})", results["cases"], cols),
                   results["cases"], files)
    _refuse_empty(results["cases"], output)


@bench_app.command("train")
@with_options(bench=TrainSettings)
def train_cmd(
    output: Path = typer.Option(..., "--output", "-o", help="RESULT_DIR for results.json, results.csv, train.png."),
    force: bool = typer.Option(False, "--force", help="Overwrite RESULT_DIR."),
    json_out: bool = typer.Option(False, "--json", help="Print results.json on stdout."),
    *, bench: TrainSettings,
):
    """Training step time, peak memory and trainable parameters for each PEFT method × block placement.

    Reproduces the study's placement-vs-cost comparison on your hardware: every case runs the finetune recipe's
    real training step on the same data; steps alternate between cases; each case's peak memory is measured
    alone in a fresh process (CPU: peak RSS; CUDA: max allocated). Ratios are to LoRA on all blocks.

    Examples:
      [bold]peft-export benchmark train -o bench_train/[/]  (LiteMedSAM, LoRA, 4 placements)
      [bold]peft-export benchmark train --model vit_b --methods lora,ssf --placements all,late:1 --steps 3 -o b/[/]
    """
    from peft_export.bench.train import plan_cases, run_train_benchmark, work_units, write_train_results

    settings = bench
    if settings.checkpoint is not None and not Path(settings.checkpoint).is_file():
        raise UsageError(f"checkpoint not found: {settings.checkpoint}")
    m, p, model = settings.methods, settings.placements, settings.model
    cases = plan_cases(m, p, settings)  # bad names and options fail here, before anything is shown or written
    _result_dir(output, force)
    with common.progress_bar("benchmark train", work_units(m, p, settings), enabled=not json_out,
                             extra_fields="{task.fields[case]}", case="") as bar:
        results = run_train_benchmark(m, p, settings, baseline=settings.baseline,
                                      progress=lambda text, n: bar.advance(n, case=text), cases=cases)
    files = write_train_results(output, results)
    if json_out:
        common.print_json(results)
        _refuse_empty(results["cases"], output)
        return
    cols = [("blocks", "blocks"), ("trainable_encoder_params", "enc. params"), ("step_median_s", "step s"),
            ("step_vs_baseline", "×"), ("peak_memory_mib", "peak MiB"), ("memory_vs_baseline", "×"),
            ("train_memory_mib", "train MiB"), ("train_memory_vs_baseline", "×")]
    title = (f"training, {model}, {results['settings']['memory_kind']} (baseline: {results['settings']['baseline']})")
    _print_results(_table(title, results["cases"], cols), results["cases"], files)
    _refuse_empty(results["cases"], output)


@bench_app.command("study")
@with_options(study=StudySettings)
def study_cmd(
    output: Path = typer.Option(..., "--output", "-o", help="RESULT_DIR: results.json/csv, table.md, study.png, "
                                "and one folder per case (the study's state, for --resume)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted study in RESULT_DIR (finished "
                                "cases are kept)."),
    force: bool = typer.Option(False, "--force", help="Start over in an existing RESULT_DIR."),
    json_out: bool = typer.Option(False, "--json", help="Print results.json on stdout."),
    *, study: StudySettings,
):
    """Quality × cost of PEFT methods and placements on YOUR data: which one should you use on THIS machine?

    Every case (method × placement) is trained with the finetune recipe for the same budget, seed, data order
    and prompts, then validated on the validation split (box / point mean IoU and mSA); its cost is measured as
    in [bold]benchmark train[/] (step time, peak and training memory, trainable parameters). Each case runs in
    fresh processes. Writes the table with ratios to the baseline, a Pareto plot (quality vs training memory
    and vs step time) and a recommendation: the cheapest case within --margin of the best quality, with the
    finetune command that trains it. Ctrl-C stops after saving; [bold]--resume[/] continues.

    Examples:
      [bold]peft-export benchmark study -o study/[/]  (LiteMedSAM on the bundled DSB2018 nuclei; 15 cases)
      [bold]peft-export benchmark study --data my_cells/ --methods lora,late_ft --placements all,late:1
      --budget 10min -o study/[/]
    """
    from peft_export.bench.study import StudyFolder, plan_study, resolve_settings, run_study

    settings = resolve_settings(study)
    cases = plan_study(settings)  # bad options fail here, before the folder is touched
    StudyFolder(output).check(settings, cases, resume=resume, force=force)
    n = len(cases)
    with common.progress_bar("benchmark study", 100 * n, enabled=not json_out,
                             extra_fields="{task.fields[case]}", case="") as bar:
        results = run_study(settings, cases, output, resume=resume, force=force,
                            progress=lambda i, f, text: bar.update(completed=int(100 * (i + f)), case=text))
    if json_out:
        common.print_json(results)
    else:
        _print_study(results, output)
    _refuse_empty(results["cases"], output)
    failed = [r["case"] for r in results["cases"] if r.get("failed")]
    if failed:
        raise PeftExportError(f"{len(failed)} case(s) failed ({', '.join(failed)}; reasons in results.json and "
                              f"each case's train.log); run the same command with --resume to retry them")


def _print_study(results: dict, output: Path) -> None:
    """A compact table (the full one, with mSA and blocks, is RESULT_DIR/table.md) and the recommendation."""
    s = results["settings"]
    ais = any("ais_msa" in r for r in results["cases"])
    cols = [("box_iou", "box IoU"), ("point_iou", "pt IoU"), *([("ais_msa", "AIS mSA")] if ais else []),
            (f"{s['metric']}_vs_baseline", "Δ"), ("step_median_s", "step s"), ("step_vs_baseline", "×"),
            ("peak_memory_mib", "peak MiB"), ("memory_vs_baseline", "×"), ("train_memory_mib", "train MiB"),
            ("train_memory_vs_baseline", "×")]
    title = f"study: {s['model']}, {s['budget']} per case (Δ {s['metric']} and × vs {s['baseline']})"
    files = [output / name for name in ("results.json", "results.csv", "table.md", "study.png")]
    _print_results(_table(title, results["cases"], cols), results["cases"], files)
    rec = results["recommendation"]
    common.out.print(f"[bold]recommended[/]: {escape(rec['text'])}", highlight=False)
    if rec.get("finetune"):
        common.out.print(f"train it: {escape(rec['finetune'])}", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="benchmark")
