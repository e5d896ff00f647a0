"""ONNX Runtime (CPU) latency of exported image encoders vs PyTorch, as ratios measured in ONE run.

Cases, timed round-robin (one call of each case per round, so that machine load hits all cases alike):
  torch_vanilla    PyTorch eager, the un-PEFT model
  torch_peft       PyTorch eager, the unmerged PEFT model (adapters as separate modules)
  ort_vanilla      ONNX Runtime, the un-PEFT model's fp32 export
  ort_merged_fp32  ONNX Runtime, the merged PEFT model's fp32 export (merge-and-export)
  ort_merged_int8  ONNX Runtime, the merged PEFT model's int8 export (static QDQ; gate at 0: every node int8)
Mask IoU of each precision vs PyTorch fp32 is the parity gate's figure (DSB2018 tile, whole ONNX chain).

    python benchmarks/export_latency.py                      # lite_medsam + LoRA late:4 (perturbed adapters)
    python benchmarks/export_latency.py --runs 10 --out results/export_latency.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _perturbed_peft_model(base, model_name: str, method: str, placement: str, seed: int, scale: float):
    import torch

    from peft_export.peft import PeftConfig, apply_peft

    model = copy.deepcopy(base).eval()
    config = PeftConfig(method, placement, {})
    apply_peft(model, config, model_name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.image_encoder.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval(), config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lite_medsam")
    ap.add_argument("--checkpoint", default=None, help="weights for a zoo model without bundled weights")
    ap.add_argument("--peft", default="lora")
    ap.add_argument("--blocks", default="late:4")
    ap.add_argument("--scale", type=float, default=0.02, help="std of the random adapter perturbation")
    ap.add_argument("--runs", type=int, default=5, help="timed rounds (after 2 warm-up rounds)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    import numpy as np
    import onnxruntime as ort
    import torch

    from peft_export.data.dataset import sample_image
    from peft_export.export import ExportOptions, Thresholds, export_model
    from peft_export.export.exporter import PreparedModel
    from peft_export.imaging import preprocess
    from peft_export.loading import load_model
    from peft_export.peft import merge_peft

    t_start = time.perf_counter()
    loaded = load_model(args.model, args.checkpoint)
    spec = loaded.spec
    vanilla = loaded.model.eval()
    peft_model, config = _perturbed_peft_model(vanilla, spec.name, args.peft, args.blocks, 1, args.scale)
    merged = merge_peft(copy.deepcopy(peft_model)).eval()
    image, sample = sample_image(spec.preprocess.img_size)
    x = preprocess(image, spec.preprocess).tensor

    tmp = Path(tempfile.mkdtemp(prefix="export-latency-"))
    loose = Thresholds(int8_iou=0.0)  # report int8's IoU instead of refusing it
    exports = {}
    for name, model, prec in (("merged_fp32", merged, "fp32"), ("merged_int8", merged, "int8"),
                              ("vanilla", vanilla, "fp32")):
        src = {"peft": config.to_dict() if model is merged else None, "merged": model is merged}
        print(f"exporting {name} ...", file=sys.stderr, flush=True)
        exports[name] = export_model(PreparedModel(model, spec, src), tmp / name,
                                     ExportOptions(precision=prec, thresholds=loose))
    export_seconds = time.perf_counter() - t_start

    from peft_export.runtime.onnx_backend import ort_session

    sessions = {k: ort_session(tmp / k / "encoder.onnx") for k in exports}
    xt = torch.from_numpy(x)

    def torch_call(m):
        def run():
            with torch.no_grad():
                return m.image_encoder(xt)
        return run

    cases = {
        "torch_vanilla": torch_call(vanilla),
        "torch_peft": torch_call(peft_model),
        "ort_vanilla": lambda: sessions["vanilla"].run(None, {"image": x}),
        "ort_merged_fp32": lambda: sessions["merged_fp32"].run(None, {"image": x}),
        "ort_merged_int8": lambda: sessions["merged_int8"].run(None, {"image": x}),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for rnd in range(2 + args.runs):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            if rnd >= 2:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}

    # sanity: the ONNX encoders compute what PyTorch computes
    with torch.no_grad():
        ref = peft_model.image_encoder(xt).numpy()
    emb = sessions["merged_fp32"].run(None, {"image": x})[0]
    fig = {k: e.report.figures for k, e in exports.items()}
    result = {
        "model": spec.name, "peft": {"method": config.method, "blocks": config.blocks}, "sample": sample,
        "runs": args.runs, "torch_threads": torch.get_num_threads(), "onnxruntime": ort.__version__,
        "median_ms": {k: round(1000 * v, 2) for k, v in med.items()},
        "ratios": {
            "ort_merged_fp32 / torch_peft (speed-up of deploying the merged export)":
                med["torch_peft"] / med["ort_merged_fp32"],
            "ort_merged_fp32 / ort_vanilla (cost of the merged PEFT model; 1.0 = none)":
                med["ort_merged_fp32"] / med["ort_vanilla"],
            "torch_peft / torch_vanilla (cost of unmerged adapters in PyTorch)":
                med["torch_peft"] / med["torch_vanilla"],
            "ort_vanilla vs torch_vanilla (speed-up)": med["torch_vanilla"] / med["ort_vanilla"],
            "ort_merged_int8 vs ort_merged_fp32 (speed-up)": med["ort_merged_fp32"] / med["ort_merged_int8"],
        },
        "mask_iou_vs_pytorch_fp32": {"fp32": fig["merged_fp32"]["mask_iou_mean"],
                                     "int8": fig["merged_int8"]["mask_iou_mean"],
                                     "int8_min": fig["merged_int8"]["mask_iou_min"]},
        "fp32_embedding_max_abs_diff_vs_unmerged_peft": float(np.abs(emb - ref).max()),
        "encoder_bytes": {k: (tmp / k / "encoder.onnx").stat().st_size for k in exports},
        "export_seconds": round(export_seconds, 1),
    }
    print(f"export latency: {spec.name} + {config.method} blocks {config.blocks} (adapters perturbed), "
          f"{args.runs} interleaved rounds, sample {sample}")
    for k, v in result["median_ms"].items():
        print(f"  {k:18s} {v:9.1f} ms (median)")
    print("ratios (one run):")
    for k, v in result["ratios"].items():
        print(f"  {v:6.2f}x  {k}")
    iou = result["mask_iou_vs_pytorch_fp32"]
    print(f"mask IoU vs PyTorch fp32 (whole ONNX chain): fp32 {iou['fp32']:.4f}, int8 {iou['int8']:.4f} "
          f"(min {iou['int8_min']:.4f})")
    print(f"fp32 export vs unmerged PEFT model: embedding max |diff| "
          f"{result['fp32_embedding_max_abs_diff_vs_unmerged_peft']:.2e}")
    print(f"encoder.onnx bytes: {result['encoder_bytes']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
