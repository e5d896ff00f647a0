"""``peft-export benchmark train|infer``: training cost vs placement; inference latency across backends."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from peft_export.errors import PeftExportError, UsageError
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
        _refuse_empty(results["cases"], output)
        return
    cols = [("blocks", "blocks"), ("trainable_encoder_params", "enc. params"), ("step_median_s", "step s"),
            ("step_vs_baseline", "×"), ("peak_memory_mib", "peak MiB"), ("memory_vs_baseline", "×"),
            ("train_memory_mib", "train MiB"), ("train_memory_vs_baseline", "×")]
    title = (f"training, {model}, {results['settings']['memory_kind']} (baseline: {results['settings']['baseline']})")
    _print_results(_table(title, results["cases"], cols), results["cases"], files)
    _refuse_empty(results["cases"], output)


@bench_app.command("study")
def study_cmd(
    output: Path = typer.Option(..., "--output", "-o", help="RESULT_DIR: results.json/csv, table.md, study.png, "
                                "and one folder per case (the study's state, for --resume)."),
    model: str = typer.Option("lite_medsam", help="Zoo model (lite_medsam, vit_b, vit_l, vit_h, vit_t)."),
    data: str = typer.Option("sample:dsb2018", "--data", "-d", help="Training data: DIR with images/ + labels/ "
                             "(train/ + val/ sub-folders give the validation split) or sample:dsb2018."),
    val: str = typer.Option(None, help="Validation DIR, when --data has no val/ split."),
    checkpoint: Path = typer.Option(None, "--checkpoint", "-c", help="Base weights (lite_medsam: bundled; "
                                    "SAM models need theirs: the study measures quality)."),
    methods: str = typer.Option("lora,fact,ssf,late_ft,attention", help="Comma-separated PEFT methods."),
    placements: str = typer.Option("all,late:50%,late:1", help="Comma-separated block placements: all, late:N, "
                                   "late:P%, 6-11, 0,3,9."),
    budget: str = typer.Option("30", help="The same training budget per case: steps (30) or minutes (5min; "
                               "turned into steps per case from its measured step time)."),
    recipe: str = typer.Option("auto", help="finetune preset for the options below left unset: cpu, study, "
                               "auto (study on CUDA)."),
    batch_size: int = typer.Option(None, help="Images per step (preset: cpu 1, study 2)."),
    objects: int = typer.Option(None, "--objects", help="Objects per image and step (preset: cpu 6, study 25)."),
    sub_iterations: int = typer.Option(None, help="Correction rounds per step (preset: cpu 2, study 8)."),
    lr: float = typer.Option(None, help="Learning rate (preset: cpu 2e-4, study 1e-5)."),
    rank: int = typer.Option(None, help="Rank for LoRA / FacT (default: the method's)."),
    seed: int = typer.Option(0, help="Seed: the same data order, crops and prompts in every case."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    precision: str = typer.Option("fp32", help="fp32, or on CUDA fp16 / bf16 (autocast)."),
    trunk_cache: bool = typer.Option(False, "--trunk-cache/--no-trunk-cache", help="finetune's frozen-trunk "
                                     "cache (off: step times are the methods' own, as in the study)."),
    instance_decoder: bool = typer.Option(False, "--instance-decoder", help="Train finetune's instance decoder "
                                          "too and report its AIS figures (needs a finetune that has it)."),
    metric: str = typer.Option("mean_iou", help="Quality for the recommendation: mean_iou (box and point), "
                               "box_iou, point_iou, box_msa, point_msa, ais_msa."),
    cost: str = typer.Option("peak_memory", help="Cost for the recommendation: peak_memory, train_memory, "
                             "step_time, train_time."),
    margin: float = typer.Option(0.02, help="Quality margin: the cheapest case within this of the best wins."),
    memory_steps: int = typer.Option(2, help="Steps (after 1 warm-up) of each case's memory run, as benchmark "
                                     "train."),
    baseline: str = typer.Option(None, help="Case the ratios refer to (default 'lora all')."),
    keep_checkpoints: bool = typer.Option(False, "--keep-checkpoints", help="Keep each case's best.pt/latest.pt "
                                          "(default: removed once the case is measured)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted study in RESULT_DIR (finished "
                                "cases are kept)."),
    force: bool = typer.Option(False, "--force", help="Start over in an existing RESULT_DIR."),
    json_out: bool = typer.Option(False, "--json", help="Print results.json on stdout."),
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
    from peft_export.bench.study import StudyFolder, StudySettings, plan_study, resolve_settings, run_study

    settings = resolve_settings(StudySettings(
        model=model, data=data, val=val, checkpoint=str(checkpoint) if checkpoint else None,
        methods=common.parse_list(methods, None, "method"), placements=common.parse_list(placements, None,
                                                                                       "placement"),
        budget=budget, recipe=recipe, seed=seed, batch_size=batch_size, objects_per_image=objects,
        sub_iterations=sub_iterations, lr=lr, rank=rank, device=device, precision=precision,
        trunk_cache=trunk_cache, instance_decoder=instance_decoder, baseline=baseline, metric=metric, cost=cost,
        margin=margin, memory_steps=memory_steps, keep_checkpoints=keep_checkpoints))
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
