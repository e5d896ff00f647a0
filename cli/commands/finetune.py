"""``peft-export finetune``: the study's interactive SAM training recipe with a PEFT method on chosen blocks."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import typer
from rich.table import Table

from peft_export.train.config import RUN, TrainOptions
from peft_export_cli import common
from peft_export_cli.options import with_options


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
                        f"{_instance_mode(inst)}")
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
    @with_options(train=TrainOptions)
    def finetune_cmd(
        out: Path = typer.Option(..., "--out", "-o", help="Run folder (RUN_DIR): config.yaml, metrics.jsonl, "
                                 "best.pt, latest.pt, summary.json.", rich_help_panel=RUN),
        config: Path = typer.Option(None, "--config", help="YAML or TOML file with any of these options "
                                    "(command-line values win).", rich_help_panel=RUN),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly where it stopped.",
                                    rich_help_panel=RUN),
        force: bool = typer.Option(False, "--force", help="Start over in an existing --out.", rich_help_panel=RUN),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output.", rich_help_panel=RUN),
        json_out: bool = typer.Option(False, "--json", help="Print the run summary as JSON on stdout.",
                                      rich_help_panel=RUN),
        *, train: TrainOptions,
    ):
        """Finetune SAM with a PEFT method on chosen encoder blocks, with the study's interactive recipe.

        Objects are sampled per image; point and box prompts alternate (--point-fraction sets the share of
        point steps); each step runs iterative correction rounds (points from false-negative/false-positive
        pixels, previous logits as mask input) with a Dice + IoU-regression loss. Validation each epoch measures
        box/point mean IoU and mSA on held-out images (the same code as [bold]peft-export evaluate[/]); best.pt
        and latest.pt are written atomically and can be merged: [bold]peft-export merge RUN_DIR/best.pt -o
        merged.pt[/].

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
        from peft_export.train import configure_run, finetune, read_config_file

        values = train.given()  # the flags given: the configuration file sits between the defaults and them
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


def _instance_mode(inst: dict) -> str:
    if not inst["only"]:
        return "trained jointly (loss added)"
    if inst.get("prompt_decoder"):
        return "trained with the prompt decoder (SAM's encoder frozen)"
    return "trained alone (SAM frozen)"
