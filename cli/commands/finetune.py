"""``peft-export finetune``: the study's interactive SAM training recipe with a PEFT method on chosen blocks."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import typer
from rich.table import Table

from peft_export_cli import common
from peft_export_cli import peft_options as po

TRAIN = "Training"
DATA = "Data"
VAL = "Validation"
RUN = "Run"
AIS = "Automatic instance segmentation"


def _opt(*names, help: str, panel: str = TRAIN, **kw):
    # "[default: x]" would be read as rich markup and vanish from --help
    return typer.Option(None, *names, help=help.replace("[default:", "\\[default:"), rich_help_panel=panel, **kw)


class _CliEvents:
    """Renders the training loop's events: one progress bar, one line per epoch."""

    def __init__(self, show: bool, quiet: bool):
        self.show = show
        self.quiet = quiet
        self.bar = None
        self.epoch_text = ""
        self.loss = float("nan")
        self.val = ""
        self.speed = 0.0
        self.metric_name = "val"

    def message(self, text: str) -> None:
        if text.startswith("warning: "):
            common.warn(text[len("warning: "):])
        elif not self.quiet:
            common.info(text)

    def start(self, total: int, done: int, info: dict) -> None:
        if self.bar is not None:
            self.bar.update(total=total, completed=done)
        if self.quiet:
            return
        peft = info["peft"]
        params = info["parameters"]
        common.info(f"[bold]{info['model']}[/] + {peft['method']} on blocks {peft['blocks'] or '-'} "
                    f"({peft['placement']}); trainable: encoder {params['image_encoder']:,}, prompt encoder + mask "
                    f"decoder {params['prompt_encoder'] + params['mask_decoder']:,} of {params['all_parameters']:,}")
        inst = info.get("instance_decoder")
        if inst:
            common.info(f"instance decoder ({inst['levels']} upsampling levels, {inst['features']} features): "
                        f"{params['instance_decoder']:,} parameters, "
                        f"{'trained alone (SAM frozen)' if inst['only'] else 'trained jointly (loss added)'}")
        common.info(f"{info['train_patches']} training patch(es), {info['val_images']} validation image(s); "
                    f"{info['steps_per_epoch']} step(s)/epoch, {info['epochs']} epoch(s); device {info['device']} "
                    f"{info['precision']}, {info['world_size']} process(es); "
                    f"{'multimask first point prompt' if info['multimask'] else 'single-mask output for all prompts'}")
        if info["trunk_cache"].startswith("trunk cache on"):  # the reasons for "off" came as messages
            common.info(info["trunk_cache"])

    def _refresh(self) -> None:
        if self.bar is None:
            return
        loss = f"loss {self.loss:.4f}" if math.isfinite(self.loss) else "loss -"
        speed = f"{self.speed:.2f} it/s" if self.speed else ""
        parts = [p for p in (self.epoch_text, loss, self.val, speed) if p]
        self.bar.update(description=" · ".join(parts))

    def phase(self, text: str) -> None:
        self.epoch_text = text
        self._refresh()

    def step(self, done: int, loss: float, speed: float) -> None:
        self.loss, self.speed = loss, speed
        if self.bar is not None:
            self.bar.update(completed=done)
        self._refresh()

    def validation(self, rec: dict) -> None:
        val = rec.get("val") or {}
        parts = [f"instance mSA {v['msa']:.3f} F1 {v['f1']:.3f} ({v['objects_pred']}/{v['objects_true']} objects)"
                 if k == "instance" else f"{k} IoU {v['mean_iou']:.3f}" for k, v in val.items()]
        if parts:
            self.val = "val " + ", ".join(parts)
        self._refresh()
        if self.quiet:
            return
        if rec["epoch"] == 0:
            common.info(f"before training: {', '.join(parts)}")
            return
        line = f"epoch {rec['epoch']} (iteration {rec['iteration']}): loss {rec['train_loss']:.4f}"
        if parts:
            line += ", " + ", ".join(parts)
        if rec.get("best"):
            line += " [green](best)[/]"
        common.info(line)


def _result_table(summary: dict) -> Table:
    table = Table(title=f"{summary['model']} + {summary['peft']['method']} ({summary['peft']['placement']}): "
                        f"validation", show_header=True)
    table.add_column("prompt")
    for col in ("before IoU", "before mSA", "best IoU", "best mSA"):
        table.add_column(col, justify="right")
    before = summary.get("before") or {}
    best = (summary.get("best") or {}).get("val") or {}

    def fmt(d, k, m):
        v = (d.get(k) or {}).get(m)
        return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"

    for k in sorted(set(before) | set(best)):
        name = "automatic (instance decoder)" if k == "instance" else k
        table.add_row(name, fmt(before, k, "mean_iou"), fmt(before, k, "msa"), fmt(best, k, "mean_iou"),
                      fmt(best, k, "msa"))
    return table


def register(app: typer.Typer) -> None:
    @app.command("finetune")
    @po.with_peft_options(defaults_note=True)
    def finetune_cmd(
        out: Path = typer.Option(..., "--out", "-o", help="Run folder (RUN_DIR): config.yaml, metrics.jsonl, "
                                 "best.pt, latest.pt, summary.json.", rich_help_panel=RUN),
        model: str = _opt("--model", help="Zoo model (lite_medsam, vit_b, vit_l, vit_h, vit_t) or a checkpoint file "
                          "[default: lite_medsam].", panel=TRAIN),
        checkpoint: str = _opt("--checkpoint", "-c", help="Base weights for --model (lite_medsam: bundled).",
                               panel=TRAIN),
        instance_decoder: bool = typer.Option(None, "--instance-decoder/--no-instance-decoder", help="Also train "
                                              "micro-sam's instance decoder (foreground, centre and boundary "
                                              "distance maps for automatic segmentation without prompts), its loss "
                                              "added to the prompt losses; merge-and-export writes it as "
                                              "instance_decoder.onnx \\[default: off].", rich_help_panel=AIS),
        instance_decoder_only: bool = typer.Option(None, "--instance-decoder-only", help="Train only the instance "
                                                   "decoder on the frozen model (cheapest: with the trunk cache the "
                                                   "encoder runs once per patch); e.g. on a finetuned run: --model "
                                                   "RUN/best.pt. Validation metric: the automatic segmentation's "
                                                   "mSA.", rich_help_panel=AIS),
        data: str = _opt("--data", "-d", help="DIR with images/ + labels/ (optional train/ val/ sub-folders), or "
                         "sample:dsb2018 [default: sample:dsb2018].", panel=DATA),
        val: str = _opt("--val", help="Validation DIR (default: the val split of --data, if it has one).",
                        panel=DATA),
        recipe: str = _opt("--recipe", help="Preset for the options below: study (micro-sam's defaults), cpu "
                           "(a few CPU-minutes), auto (study on CUDA, cpu otherwise) [default: auto]."),
        epochs: int = _opt("--epochs", help="Number of epochs (cpu preset 6, study 100)."),
        iterations: int = _opt("--iterations", help="Number of optimisation steps instead of --epochs."),
        samples_per_epoch: int = _opt("--samples-per-epoch", help="Images per epoch (default: one pass over the "
                                      "training patches)."),
        batch_size: int = _opt("--batch-size", help="Images per step (cpu 1, study 2); embeddings computed once "
                               "per batch."),
        lr: float = _opt("--lr", help="AdamW learning rate (cpu 2e-4, study 1e-5)."),
        weight_decay: float = _opt("--weight-decay", help="AdamW weight decay [default: 0.01]."),
        objects_per_image: int = _opt("--objects-per-image", help="Objects sampled per image (cpu 6, study 25)."),
        sub_iterations: int = _opt("--sub-iterations", help="Iterative-correction rounds per step (cpu 2, study 8)."),
        mask_prob: float = _opt("--mask-prob", help="Probability of feeding the previous logits as mask input "
                                "[default: 0.5]."),
        multimask: str = _opt("--multimask", help="auto, on, off: 3 masks for the first point prompt (the study). "
                              "auto: on when the model's multimask outputs were trained (not LiteMedSAM)."),
        scheduler_factor: float = _opt("--scheduler-factor", help="ReduceLROnPlateau factor [default: 0.9]."),
        scheduler_patience: int = _opt("--scheduler-patience", help="ReduceLROnPlateau patience in epochs "
                                       "[default: 10]."),
        early_stopping: int = _opt("--early-stopping", help="Stop after N epochs without improvement (0: never) "
                                   "[default: 10]."),
        patch_size: int = _opt("--patch-size", help="Training patch size in image pixels (default: the model input "
                               "size, at most 512; 0: whole images); resized to the model input.", panel=DATA),
        patch_sampling: str = _opt("--patch-sampling", help="tiles (fixed grid, default) or random crops.",
                                   panel=DATA),
        augment: str = _opt("--augment", help="Comma-separated: flip, rot90, intensity (default: none).",
                            panel=DATA),
        min_object_area: int = _opt("--min-object-area", help="Smallest object (pixels at model resolution) used "
                                    "for training [default: 10].", panel=DATA),
        val_every: int = _opt("--val-every", help="Validate every N epochs [default: 1].", panel=VAL),
        val_prompts: str = _opt("--val-prompts", help="Prompt types to validate: box, point [default: box,point].",
                                panel=VAL),
        val_metric: str = _opt("--val-metric", help="Metric for best.pt, the scheduler and early stopping: box, "
                               "point or mean (mean IoU), or instance (the instance decoder's automatic "
                               "segmentation mSA) [default: box; instance with --instance-decoder-only].",
                               panel=VAL),
        val_before: bool = typer.Option(None, "--val-before/--no-val-before", help="Validate before training "
                                        "(epoch 0 in metrics.jsonl) [default: on].", rich_help_panel=VAL),
        trunk_cache: str = _opt("--trunk-cache", help="auto, memory, disk, off: cache the frozen encoder trunk's "
                                "output per repeating input [default: auto].", panel=RUN),
        trunk_cache_mb: int = _opt("--trunk-cache-mb", help="Size budget of the trunk cache [default: 2048].",
                                   panel=RUN),
        device: str = _opt("--device", help="auto, cpu or cuda [default: auto].", panel=RUN),
        precision: str = _opt("--precision", help="auto (fp16 autocast + GradScaler on CUDA, fp32 on CPU), fp32, "
                              "fp16, bf16.", panel=RUN),
        threads: int = _opt("--threads", help="CPU threads of torch (0: torch's default, one per core). On a "
                            "small CPU shared with other jobs, 1 is often faster [default: 0].", panel=RUN),
        seed: int = _opt("--seed", help="Seed of every random choice [default: 0].", panel=RUN),
        config: Path = typer.Option(None, "--config", help="YAML or TOML file with any of these options "
                                    "(command-line values win).", rich_help_panel=RUN),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly where it stopped.",
                                    rich_help_panel=RUN),
        force: bool = typer.Option(False, "--force", help="Start over in an existing --out.", rich_help_panel=RUN),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output.", rich_help_panel=RUN),
        json_out: bool = typer.Option(False, "--json", help="Print the run summary as JSON on stdout.",
                                      rich_help_panel=RUN),
        *, peft_args: po.PeftArgs,
    ):
        """Finetune SAM with a PEFT method on chosen encoder blocks, with the study's interactive recipe.

        Objects are sampled per image; point and box prompts alternate; each step runs iterative correction
        rounds (points from false-negative/false-positive pixels, previous logits as mask input) with a Dice +
        IoU-regression loss. Validation each epoch measures box/point mean IoU and mSA on held-out images
        (the same code as [bold]peft-export evaluate[/]); best.pt and latest.pt are written atomically and can
        be merged: [bold]peft-export merge RUN_DIR/best.pt -o merged.pt[/].

        Late placements (--blocks late:N) freeze the encoder before the first adapted block; with repeating
        inputs its output is cached, so later epochs run only the late blocks. Ctrl-C saves a checkpoint;
        [bold]--resume[/] continues exactly. Multi-GPU: [bold]torchrun --nproc-per-node 4 -m peft_export_cli.app
        finetune ...[/]

        Example (bundled LiteMedSAM weights and DSB2018 nuclei, a few CPU-minutes):
        [bold]peft-export finetune --model lite_medsam --data sample:dsb2018 --peft lora --rank 32
        --blocks late:4 --out runs/lora_late4[/]

        Automatic segmentation (micro-sam's AIS): add [bold]--instance-decoder[/]; then
        [bold]peft-export predict EXPORT_DIR image.tif --auto -o labels.tif[/] segments without prompts.
        """
        given = dict(locals())  # the options, by parameter name
        from peft_export.train import configure_run, finetune, read_config_file
        from peft_export.train.config import field_names

        values = {k: v for k, v in given.items() if k in field_names() and v is not None}
        values.update(peft_args.config_values())
        file_values = read_config_file(config) if config is not None else {}
        cfg = configure_run(out, resume=resume, force=force, file_values=file_values, cli_values=values)
        show = not (quiet or json_out)
        events = _CliEvents(show, quiet or json_out)
        t0 = time.perf_counter()
        with common.progress_bar("finetune: preparing", None, enabled=show) as bar:
            events.bar = bar
            summary = finetune(cfg, out, resume=resume, force=force, events=events)
        if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports
            return
        if json_out:
            common.print_json(summary)
            return
        if summary.get("before") or summary.get("best"):
            common.out.print(_result_table(summary))
        best = summary.get("best") or {}
        line = (f"[green]done[/] ({summary['stopped']}) in {time.perf_counter() - t0:.0f} s, "
                f"{summary['iterations']} iterations: best epoch {best.get('epoch', '-')} -> {out / 'best.pt'}")
        common.out.print(line, highlight=False)
