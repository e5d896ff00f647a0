"""int8 on this CPU: quality vs fp32 on held-out tiles, encoder latency (one run, interleaved), per-op profile.

    python benchmarks/int8_cpu.py demo_run/best.pt            # the README's LoRA LiteMedSAM (its main command)
    python benchmarks/int8_cpu.py demo_run/best.pt --iou 0.95,0.97 --modes static,dynamic --out int8.json
    python benchmarks/int8_cpu.py --exports fp32=a/,fp32_opset18=b/,int8_static_0.97=c/   # measure existing exports

For the checkpoint it exports fp32 (opset 20, the default), fp32 at opset 18 (the previous default: GELU as
Div/Erf/Add/Mul) and int8 for every mode x gate threshold asked for, with the export's own calibration (the
checkpoint's training tiles) and gate. Then, on the DSB2018 held-out tile and its seven flips/rotations (never
calibration images), one box and one point prompt per hand-drawn nucleus: mean and min per-object mask IoU of each
int8 export vs the fp32 export. Latency: the encoders called round-robin (one call each per round) after warm-up,
median per case, ratio to fp32 from the same run. Profile: ONNX Runtime's per-op profiler on each encoder, the
share of time per op type and the share left in float ops.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

INT8_OPS = {"QLinearMatMul", "QLinearConv", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
            "ConvInteger", "QGemm"}
CONVERSION_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


def _export(ckpt: str, out: Path, **kw):
    from peft_export.export import ExportOptions, Thresholds, export_model, prepare_for_export
    from peft_export.export.quantize import Int8Options
    from peft_export.loading import load_model

    iou = kw.pop("iou", 0.97)
    int8 = Int8Options(**kw.pop("int8", {}))
    print(f"exporting {out.name} ...", file=sys.stderr, flush=True)
    return export_model(prepare_for_export(load_model(ckpt)), out,
                        ExportOptions(thresholds=Thresholds(int8_iou=iou), int8=int8, **kw))


def _quality(fp32_dir: Path, int8_dir: Path) -> dict:
    """Per-object mask IoU int8 vs fp32 on the held-out tile and its 7 flips/rotations."""
    import numpy as np

    from peft_export.data.dataset import dsb2018_tiles
    from peft_export.data.objects import objects_from_labels
    from peft_export.export.calibration import dihedral
    from peft_export.metrics import mask_ious
    from peft_export.runtime.evaluate import predict_objects, prompts_for
    from peft_export.runtime.segmenter import Segmenter

    segs = {"fp32": Segmenter(fp32_dir), "int8": Segmenter(int8_dir)}
    per = {"box": [], "point": []}
    for tile in dsb2018_tiles("val"):
        for k in range(8):
            image, labels = dihedral(tile.image, k), dihedral(tile.labels, k)
            objects = objects_from_labels(labels)
            masks = {}
            for name, seg in segs.items():
                geo = seg.set_image(image).geometry[0]  # an untiled tile: one model-input geometry
                emb = seg.tile_embeddings([0])
                masks[name] = {kind: predict_objects(seg.backend, emb, geo,
                                                     *prompts_for(objects, geo, kind, seg.info.multimask))[0]
                               for kind in per}
            for kind in per:
                per[kind].append(mask_ious(masks["int8"][kind], masks["fp32"][kind]))
    out = {}
    for kind, v in per.items():
        a = np.concatenate(v)
        out[kind] = {"mean_iou": round(float(a.mean()), 4), "min_iou": round(float(a.min()), 4), "objects": len(a)}
    return out


def _latency(folders: dict[str, Path], runs: int) -> dict[str, float]:
    from peft_export.data.dataset import dsb2018_tiles
    from peft_export.imaging import preprocess
    from peft_export.manifest import read_manifest
    from peft_export.runtime.onnx_backend import ort_session

    spec = read_manifest(next(iter(folders.values()))).preprocess_spec
    x = preprocess(dsb2018_tiles("val")[0].image, spec).tensor
    sessions = {k: ort_session(d / "encoder.onnx") for k, d in folders.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for rnd in range(2 + runs):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {"image": x})
            if rnd >= 2:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _profile(folder: Path, runs: int = 3) -> dict:
    import onnxruntime as ort

    from peft_export.data.dataset import dsb2018_tiles
    from peft_export.imaging import preprocess
    from peft_export.manifest import read_manifest

    x = preprocess(dsb2018_tiles("val")[0].image, read_manifest(folder).preprocess_spec).tensor
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_profiling = True
    opts.profile_file_prefix = str(folder / "ort_profile")
    s = ort.InferenceSession(str(folder / "encoder.onnx"), opts, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        s.run(None, {"image": x})
    path = Path(s.end_profiling())
    by: Counter = Counter()
    for e in json.loads(path.read_text()):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by[e["args"]["op_name"]] += e["dur"]
    path.unlink()
    total = sum(by.values()) or 1
    share = {op: round(100 * v / total, 1) for op, v in by.most_common()}
    return {"ms_per_run": round(total / runs / 1000, 1), "share_percent": share,
            "int8_ops_percent": round(sum(v for k, v in share.items() if k in INT8_OPS), 1),
            "q_dq_percent": round(sum(v for k, v in share.items() if k in CONVERSION_OPS), 1),
            "float_ops_percent": round(sum(v for k, v in share.items() if k not in INT8_OPS | CONVERSION_OPS), 1)}


def _export_all(ckpt: str, tmp: Path, modes: list[str], ious: list[float]) -> dict[str, Path]:
    folders = {"fp32": tmp / "fp32", "fp32_opset18": tmp / "fp32_opset18"}
    _export(ckpt, folders["fp32"])
    _export(ckpt, folders["fp32_opset18"], opset=18)
    for mode in modes:
        for iou in ious:
            folders[f"int8_{mode}_{iou:g}"] = tmp / f"int8_{mode}_{iou:g}"
            _export(ckpt, folders[f"int8_{mode}_{iou:g}"], precision="int8", iou=iou, int8={"mode": mode})
    return folders


def _int8_record(folder: Path) -> dict:
    from peft_export.manifest import read_manifest

    rec = read_manifest(folder).extra["int8"]
    return {"gate": rec["gate"], "quantized_nodes": rec["quantized_nodes"], "candidates": rec["candidates"],
            "export_seconds": rec["seconds"], "mode": rec["mode"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", help="a peft-export training checkpoint (e.g. the README demo's best.pt)")
    ap.add_argument("--exports", default=None,
                    help="measure existing export folders instead of exporting: NAME=DIR,... (needs fp32=DIR; int8 "
                         "folders named int8_*; all from one checkpoint)")
    ap.add_argument("--iou", default="0.97", help="comma-separated int8 gate thresholds")
    ap.add_argument("--modes", default="static", help="comma-separated int8 modes: static, dynamic")
    ap.add_argument("--runs", type=int, default=10, help="timed rounds after 2 warm-up rounds")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    from peft_export._malloc import tune_malloc
    from peft_export.runtime.cpu import cpu_info

    tune_malloc()  # as the CLI runs
    cpu = cpu_info()
    print(f"CPU: {cpu['model']} ({cpu['machine']}; int8 class {cpu['int8_class']}; flags {', '.join(cpu['flags'])})")
    tmp = None  # exports this run makes (removed at the end); none with --exports
    if args.exports:
        folders = {k: Path(v) for k, v in (item.split("=", 1) for item in args.exports.split(","))}
        if "fp32" not in folders:
            ap.error("--exports needs fp32=DIR")
    elif args.checkpoint:
        tmp = Path(tempfile.mkdtemp(prefix="int8-bench-"))
        folders = _export_all(args.checkpoint, tmp, args.modes.split(","), [float(v) for v in args.iou.split(",")])
    else:
        ap.error("give a checkpoint or --exports")
    records = {k: _int8_record(d) for k, d in folders.items() if k.startswith("int8")}
    quality = {k: _quality(folders["fp32"], folders[k]) for k in records}
    med = _latency(folders, args.runs)
    profiles = {k: _profile(d) for k, d in folders.items()}
    result = {"cpu": cpu, "runs": args.runs, "median_ms": {k: round(1000 * v, 1) for k, v in med.items()},
              "ratio_to_fp32": {k: round(v / med["fp32"], 3) for k, v in med.items()},
              "quality_vs_fp32_heldout": quality, "int8": records, "profile": profiles}
    print(f"encoder latency, {args.runs} interleaved rounds (median), ratio to fp32 (opset 20) of the same run:")
    for k in med:
        print(f"  {k:22s} {1000 * med[k]:8.1f} ms  {med[k] / med['fp32']:.3f}x")
    print("int8 vs fp32 on the held-out tile and its flips/rotations (one box / one point per nucleus):")
    for k, q in quality.items():
        r = records[k]
        print(f"  {k:22s} box {q['box']['mean_iou']:.4f} (min {q['box']['min_iou']:.4f})  point "
              f"{q['point']['mean_iou']:.4f} (min {q['point']['min_iou']:.4f})  {r['quantized_nodes']} of "
              f"{r['candidates']} nodes int8")
    print("per-op profile (share of encoder time):")
    for k, p in profiles.items():
        top = ", ".join(f"{op} {v}%" for op, v in list(p["share_percent"].items())[:6])
        print(f"  {k:22s} {p['ms_per_run']} ms/run; int8 ops {p['int8_ops_percent']}%, Q/DQ {p['q_dq_percent']}%, "
              f"float ops {p['float_ops_percent']}%; {top}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if tmp is not None:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
