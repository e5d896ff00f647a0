"""Automatic segmentation without prompts, three ways in one run: APG, the instance decoder (AIS), the point grid.

    python benchmarks/ais_vs_grid.py EXPORT_DIR [--checkpoint RUN/best.pt] [--out docs/bench_ais_vs_grid.json]

EXPORT_DIR: a `merge-and-export` folder of a run trained with `finetune --instance-decoder` (it has
instance_decoder.onnx). Every method runs on the same export with ONNX Runtime (CPU) on
- the DSB2018 held-out tile (256x256, never trained on),
- the whole DSB2018 image (512x512, tiled at native resolution; three of its four tiles are the training tiles),
- with --mosaic: the 1024x1024 mosaic of the image and its flips (500 nuclei; 3 of every copy's 4 tiles trained on).

Methods: ``apg`` (micro-sam's APG at its defaults: seeds as point prompts, NMS 0.9, min size 25), ``apg_box``
(APG with micro-sam's refine_with_box_prompts), ``apg_score`` (APG with the merge of micro-sam's SAM2 APG,
``--apg-merge score``, max overlap 0.15), ``ais`` (the instance decoder + seeded watershed at micro-sam's
defaults), ``grid`` (the point grid at `predict --auto`'s defaults; --grid-best also at its best thresholds on the
held-out tile, chosen on the evaluation tile itself: an upper bound for the grid). The grid is skipped on the
mosaic (minutes per image on a CPU).

Figures per method and image: mSA (IoU 0.5..0.95), precision / recall / F1 at IoU 0.5, objects found vs true,
seconds per image (embedding + automatic segmentation; median of --repeats runs, the methods interleaved round by
round), and the ratios to AIS. The CPU, its core count and the load average before and after are recorded: on a
shared machine absolute seconds are inflated, ratios from one run are what to compare.

With --checkpoint (the run's PyTorch checkpoint): PyTorch vs ONNX Runtime labels on the held-out tile for AIS and
APG (object-matched IoU, and the objects each finds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from peft_export.bench.common import cpu_name

GRID_IOU = (0.5, 0.6, 0.7, 0.8, 0.88)
GRID_STABILITY = (0.6, 0.75, 0.9)
KEYS = ("msa", "precision", "recall", "f1", "objects_pred", "objects_true")


def mosaic_1024():
    """The 1024x1024 mosaic of the DSB2018 image and its flips (x, y, both) with labels to match (as
    tests/test_runtime_scale.py's dsb_mosaic)."""
    import numpy as np

    from peft_export.data.samples import dsb2018

    img, lab = dsb2018()
    n = int(lab.max())
    flips = [lab, lab[:, ::-1], lab[::-1], lab[::-1, ::-1]]
    labs = [np.where(f > 0, f + k * n, 0) for k, f in enumerate(flips)]
    image = np.block([[img, img[:, ::-1]], [img[::-1], img[::-1, ::-1]]])
    return image, np.block([[labs[0], labs[1]], [labs[2], labs[3]]]).astype(np.int32)


def _cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(seg, sample, options):
    """(labels, seconds for the whole image: embedding + automatic segmentation, and the CPU seconds of it)."""
    t0, c0 = time.perf_counter(), _cpu()
    seg.set_image(sample.image, name=sample.name)
    labels = seg.segment(options)
    return labels, time.perf_counter() - t0, _cpu() - c0


def measure(seg, sample, cases: dict, repeats: int) -> dict:
    from peft_export.metrics import instance_scores

    times = {k: [] for k in cases}
    cpu = {k: [] for k in cases}
    labels = {}
    for _ in range(repeats):  # interleaved: one call of each case per round
        for name, options in cases.items():
            labels[name], dt, dc = run(seg, sample, options)
            times[name].append(dt)
            cpu[name].append(dc)
    out = {}
    for name in cases:
        s = instance_scores(labels[name], sample.labels)
        out[name] = {k: round(float(s[k]), 4) for k in KEYS}
        out[name]["seconds"] = round(statistics.median(times[name]), 3)
        out[name]["cpu_seconds"] = round(statistics.median(cpu[name]), 3)  # all threads; less load-dependent
    if "ais" in out:
        for name in cases:
            if name != "ais":
                out[f"{name}_vs_ais"] = {"msa_gain": round(out[name]["msa"] - out["ais"]["msa"], 4),
                                         "time_ratio": round(out[name]["seconds"] / out["ais"]["seconds"], 2)}
    return out


def best_grid(seg, tile) -> tuple[object, list]:
    from peft_export.metrics import mean_segmentation_accuracy
    seg.set_image(tile.image, name=tile.name)
    sweep = []
    for iou in GRID_IOU:
        for st in GRID_STABILITY:
            msa = mean_segmentation_accuracy(seg.segment(grid(iou, st)), tile.labels)
            sweep.append({"pred_iou_thresh": iou, "stability_thresh": st, "msa": round(float(msa), 4)})
    top = max(sweep, key=lambda r: r["msa"])
    return grid(top["pred_iou_thresh"], top["stability_thresh"]), sweep


def grid(iou: float | None = None, stability: float | None = None):
    from peft_export.runtime.strategies import AutoOptions

    return AutoOptions.parse({"method": "grid", "grid.pred_iou_thresh": iou, "grid.stability_thresh": stability})


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
    out = {}
    for method in ("instance", "apg"):
        a, b = seg.segment(method=method), ref.segment(method=method)
        out[method] = {"matched_iou": round(matched_iou(a, b), 4), "objects_onnx": int(a.max()),
                       "objects_torch": int(b.max())}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export")
    ap.add_argument("--checkpoint", help="the run's checkpoint: PyTorch vs ONNX Runtime labels")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="write the JSON here too (e.g. docs/bench_ais_vs_grid.json)")
    ap.add_argument("--no-grid", action="store_true", help="AIS and APG only (the grid takes minutes per image)")
    ap.add_argument("--grid-best", action="store_true", help="also the grid at its best thresholds (a sweep of 15 "
                    "threshold pairs on the held-out tile)")
    ap.add_argument("--mosaic", action="store_true", help="also the 1024x1024 mosaic (AIS and APG)")
    args = ap.parse_args(argv)

    from peft_export.data.dataset import Sample, dsb2018_tiles
    from peft_export.data.samples import dsb2018
    from peft_export.runtime.segmenter import Segmenter
    from peft_export.runtime.strategies import AutoOptions

    seg = Segmenter(args.export)
    tile = dsb2018_tiles("val")[0]
    image, labels = dsb2018()
    whole = Sample(image, labels, "dsb2018_whole")
    result = {"cpu": cpu_name(), "cores": os.cpu_count(), "load_avg_before": [round(v, 2) for v in os.getloadavg()],
              "export": args.export, "repeats": args.repeats,
              "backend": seg.info.name, "compute": seg.info.compute}  # what --backend auto chose here
    cases = {"apg": AutoOptions.parse({"method": "apg"}),
             "apg_box": AutoOptions.parse({"method": "apg", "apg.refine_with_boxes": True}),
             "apg_score": AutoOptions.parse({"method": "apg", "apg.merge": "score"}),
             "ais": AutoOptions.parse({"method": "instance"})}
    if not args.no_grid:
        cases["grid_default"] = grid()
        if args.grid_best:
            best, sweep = best_grid(seg, tile)
            cases["grid_best"] = best
            result.update(grid_best_thresholds={"pred_iou_thresh": best.grid.pred_iou_thresh,
                                                "stability_thresh": best.grid.stability_thresh}, grid_sweep=sweep)
    samples = [("heldout_tile", tile, cases), ("whole_image", whole, cases)]
    if args.mosaic:
        m_img, m_lab = mosaic_1024()
        samples.append(("mosaic_1024", Sample(m_img, m_lab, "mosaic_1024"),
                        {k: v for k, v in cases.items() if v.method != "grid"}))
    for name, sample, these in samples:
        result[name] = measure(seg, sample, these, args.repeats)
    if args.checkpoint:
        result["torch_vs_onnx_heldout"] = torch_vs_onnx(args.checkpoint, seg, tile)
    result["load_avg_after"] = [round(v, 2) for v in os.getloadavg()]
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
