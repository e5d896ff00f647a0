"""Training cost vs PEFT placement (the study's central claim), as in the README's "Benchmarks" table.

Runs ``peft-export benchmark train`` in-process for each model asked for (default: LiteMedSAM with its real
weights, and SAM ViT-B with random weights — step time and memory do not depend on the weight values), writes
each run's results.json / results.csv / train.png under ``--out``, and prints one markdown table per model with
the ratios of every placement to LoRA on all blocks, measured in the same run (cases alternate step by step;
peak memory is measured for each case alone in a fresh process).

    python benchmarks/train_cost.py                       # lite_medsam: all, late:50%, late:25%, late:1
    python benchmarks/train_cost.py --models vit_b --placements all,late:1 --steps 1 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def markdown(results: dict) -> str:
    m = results["machine"]
    s = results["settings"]
    lines = [f"**{s['model']}**, {', '.join(s['methods'])}; {s['steps']} timed step(s) after {s['warmup']} warm-up, "
             f"batch {s['batch_size']}, {s['objects_per_image']} objects/image; {m['cpu']}, {m['cpu_count']} cores"
             + (f", GPU {', '.join(m['gpus'])}" if m["gpus"] else "") + f"; weights: {s['checkpoint']}; "
             f"baseline: {s['baseline']} (prompt encoder + mask decoder are trained in every case)",
             "",
             "| case | blocks | trainable encoder params | step (s) | × base | peak memory (MiB) | × base "
             "| training memory (MiB) | × base |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["cases"]:
        if "skipped" in r:
            lines.append(f"| {r['case']} | skipped: {r['skipped']} | | | | | | | |")
            continue

        def f(key, fmt="{:.3g}", r=r):
            v = r.get(key)
            return "" if v is None else fmt.format(v)

        lines.append(f"| {r['case']} | {r['blocks']} | {r['trainable_encoder_params']:,} | {f('step_median_s')} | "
                     f"{f('step_vs_baseline', '{:.2f}')} | {f('peak_memory_mib', '{:.0f}')} | "
                     f"{f('memory_vs_baseline', '{:.2f}')} | {f('train_memory_mib', '{:.0f}')} | "
                     f"{f('train_memory_vs_baseline', '{:.2f}')} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lite_medsam", help="comma-separated zoo models (e.g. lite_medsam,vit_b)")
    ap.add_argument("--methods", default="lora")
    ap.add_argument("--placements", default="all,late:50%,late:25%,late:1")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="bench_results", help="folder for one sub-folder per model")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()

    from peft_export_cli.app import main as cli

    for model in args.models.split(","):
        out = Path(args.out) / f"train_{model}"
        argv = ["benchmark", "train", "--model", model, "--methods", args.methods, "--placements", args.placements,
                "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device, "-o", str(out)]
        if args.force:
            argv.append("--force")
        code = cli(argv)
        if code:
            return code
        results = json.loads((out / "results.json").read_text())
        print()
        print(markdown(results))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
