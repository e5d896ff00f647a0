"""Automatic segmentation without prompts: the instance decoder (micro-sam's AIS) vs the point grid, one run.

    python benchmarks/ais_vs_grid.py EXPORT_DIR [--checkpoint RUN/best.pt] [--out ais.json]

EXPORT_DIR: a `merge-and-export` folder of a run trained with `finetune --instance-decoder` (it has
instance_decoder.onnx). Both methods run on the same export with ONNX Runtime (CPU) on
- the DSB2018 held-out tile (256x256, never trained on), and
- the whole DSB2018 image (512x512, tiled at native resolution; three of its four tiles are the training tiles).

Figures per method: mSA (IoU 0.5..0.95), precision / recall / F1 at IoU 0.5, objects found vs true, seconds per
image (embedding + decoding + post-processing, median of --repeats runs, measured interleaved in this one run) and
the ratio grid / AIS. The grid runs at its defaults (`predict --auto` defaults) and at its best thresholds: the
best mSA on the held-out tile over a sweep of predicted-IoU x stability thresholds (chosen on the evaluation tile
itself: an upper bound for the grid). AIS runs at its defaults only.

With --checkpoint (the run's PyTorch checkpoint): PyTorch vs ONNX Runtime instance labels on the held-out tile
(object-matched IoU, and the objects each finds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from peft_export.bench.common import cpu_name

GRID_IOU = (0.5, 0.6, 0.7, 0.8, 0.88)
GRID_STABILITY = (0.6, 0.75, 0.9)


def run(seg, sample, options):
    """(labels, seconds for the whole image: embedding + automatic segmentation)."""
    t0 = time.perf_counter()
    seg.set_image(sample.image, name=sample.name)
    labels = seg.segment(options)
    return labels, time.perf_counter() - t0


def measure(seg, sample, cases: dict, repeats: int) -> dict:
    from peft_export.metrics import instance_scores

    times = {k: [] for k in cases}
    labels = {}
    for _ in range(repeats):  # interleaved: one call of each case per round
        for name, options in cases.items():
            labels[name], dt = run(seg, sample, options)
            times[name].append(dt)
    out = {}
    for name in cases:
        s = instance_scores(labels[name], sample.labels)
        out[name] = {k: s[k] for k in ("msa", "precision", "recall", "f1", "objects_pred", "objects_true")}
        out[name]["seconds"] = round(statistics.median(times[name]), 3)
    return out


def best_grid(seg, tile) -> tuple[object, list]:
    from peft_export.metrics import mean_segmentation_accuracy
    from peft_export.runtime.strategies import AutoOptions

    seg.set_image(tile.image, name=tile.name)
    sweep = []

    def grid(iou, st):
        return AutoOptions.parse({"method": "grid", "grid.pred_iou_thresh": iou, "grid.stability_thresh": st})

    for iou in GRID_IOU:
        for st in GRID_STABILITY:
            msa = mean_segmentation_accuracy(seg.segment(grid(iou, st)), tile.labels)
            sweep.append({"pred_iou_thresh": iou, "stability_thresh": st, "msa": round(float(msa), 4)})
    top = max(sweep, key=lambda r: r["msa"])
    return grid(top["pred_iou_thresh"], top["stability_thresh"]), sweep


def torch_vs_onnx(checkpoint: str, seg, tile) -> dict:
    from peft_export.loading import load_model
    from peft_export.metrics import matched_iou
    from peft_export.models.torch_backend import TorchBackend
    from peft_export.runtime.segmenter import Segmenter

    loaded = load_model(checkpoint)
    ref = Segmenter(TorchBackend(loaded.model, loaded.spec.preprocess, multimask=loaded.spec.multimask,
                                 instance_decoder=loaded.instance_decoder))
    ref.set_image(tile.image)
    seg.set_image(tile.image)
    a, b = seg.segment(method="instance"), ref.segment(method="instance")
    return {"matched_iou": round(matched_iou(a, b), 4), "objects_onnx": int(a.max()), "objects_torch": int(b.max())}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export")
    ap.add_argument("--checkpoint", help="the run's checkpoint: PyTorch vs ONNX Runtime labels")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="write the JSON here too")
    ap.add_argument("--ais-only", action="store_true", help="only the instance decoder (e.g. a decoder-only run on "
                    "the same SAM weights, whose point-grid figures are those of its base run)")
    args = ap.parse_args(argv)

    from peft_export.data.dataset import Sample, dsb2018_tiles
    from peft_export.data.samples import dsb2018
    from peft_export.runtime.segmenter import Segmenter
    from peft_export.runtime.strategies import AutoOptions

    seg = Segmenter(args.export)
    tile = dsb2018_tiles("val")[0]
    image, labels = dsb2018()
    whole = Sample(image, labels, "dsb2018_whole")
    result = {"cpu": cpu_name(), "export": args.export, "repeats": args.repeats}
    cases = {"ais": AutoOptions(method="instance")}
    if not args.ais_only:
        best_cfg, sweep = best_grid(seg, tile)
        cases.update(grid_default=AutoOptions(method="grid"), grid_best=best_cfg)
        result.update(grid_best_thresholds={"pred_iou_thresh": best_cfg.grid.pred_iou_thresh,
                                            "stability_thresh": best_cfg.grid.stability_thresh}, grid_sweep=sweep)
    for name, sample in (("heldout_tile", tile), ("whole_image", whole)):
        r = measure(seg, sample, cases, args.repeats)
        for g in [c for c in cases if c != "ais"]:
            r[f"msa_gain_vs_{g}"] = round(r["ais"]["msa"] - r[g]["msa"], 4)
            r[f"speedup_vs_{g}"] = round(r[g]["seconds"] / r["ais"]["seconds"], 2)
        result[name] = r
    if args.checkpoint:
        result["torch_vs_onnx_heldout"] = torch_vs_onnx(args.checkpoint, seg, tile)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
