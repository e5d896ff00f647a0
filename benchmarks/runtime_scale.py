"""Microscope-scale runtime figures (ONNX Runtime, CPU), measured in one run:

1. encoder throughput: tiles per second embedded one at a time (batch 1) vs in batches (``--batch``), the same
   tiles of the DSB2018 image, alternating rounds so that machine drift hits both alike (median);
2. a second prompt round on a large image (``--size``, tiled): ``set_image`` + box prompts without an embedding
   cache (every tile embedded again) vs with one (``peft-export embed`` filled it: only the decoder runs);
3. peak memory (VmHWM) of ``predict`` on a folder of 50 images vs 5, each in a fresh process: images are
   streamed, so it should be flat;
4. peak memory of embedding tiles at batch 1 vs ``--batch``, each in a fresh process (what the runtime's default
   batch size, 1 on a CPU and 4 on a GPU, trades against figure 1).

    python benchmarks/runtime_scale.py --export lite_onnx/      # an export folder (fp32 LiteMedSAM is typical)
    python benchmarks/runtime_scale.py                          # exports zero-shot LiteMedSAM first (~2 min)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from peft_export.bench.common import cpu_name

FOLDER_WORKER = r"""
import json, sys
from pathlib import Path
from peft_export._memory import peak_rss_mib
from peft_export.runtime.batch import PredictRequest, run_predict
from peft_export.runtime.segmenter import Segmenter
from peft_export.runtime.sources import resolve_inputs
export, folder, out, boxes = sys.argv[1:5]
seg = Segmenter(export, batch_size=4)
inputs = resolve_inputs(folder)
report = run_predict(seg, inputs, Path(out), PredictRequest("boxes", Path(boxes)))
print(json.dumps({"images": len(report.done), "failed": len(report.failed), "peak_rss_mib": peak_rss_mib()}))
"""

BATCH_MEMORY_WORKER = r"""
import json, sys
import numpy as np
from peft_export._memory import peak_rss_mib
from peft_export.runtime.embedding import embed_batched
from peft_export.runtime.onnx_backend import OnnxBackend
export, batch = sys.argv[1], int(sys.argv[2])
be = OnnxBackend(export)
s = be.info.img_size
feeds = [np.random.default_rng(i).normal(size=(1, 3, s, s)).astype(np.float32) for i in range(2 * batch)]
before = peak_rss_mib()
embed_batched(be, feeds, batch)
print(json.dumps({"batch": batch, "peak_rss_mib": peak_rss_mib(), "after_loading_mib": before}))
"""


def batch_memory(export: str, batch: int) -> dict:
    out = {}
    for b in (1, batch):
        res = subprocess.run([sys.executable, "-c", BATCH_MEMORY_WORKER, export, str(b)], capture_output=True,
                             text=True, check=True)
        out[b] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def mosaic(size: int) -> np.ndarray:
    """A ``size`` x ``size`` image tiled with flips of the DSB2018 nuclei image (real content at native scale)."""
    from peft_export.data.samples import dsb2018

    img, _ = dsb2018()
    row = np.concatenate([img, img[:, ::-1]] * (size // 1024 + 1), 1)
    block = np.concatenate([row, row[::-1]] * (size // 1024 + 1), 0)
    return np.ascontiguousarray(block[:size, :size])


def encoder_throughput(export: str, batch: int, n_tiles: int, rounds: int) -> dict:
    from peft_export.runtime.embedding import TileInputs, embed_batched, plan_image
    from peft_export.runtime.onnx_backend import OnnxBackend
    from peft_export.runtime.tiling import Tiling

    be = OnnxBackend(export)
    image = mosaic(1024)
    inputs = TileInputs(image, be.info.preprocess, be.info.baked_preprocessing)
    plan = plan_image(image.shape, be.info.img_size, Tiling(mode="on"))
    inputs.bind(plan)
    feeds = [inputs(i % len(plan.grid)) for i in range(n_tiles)]
    embed_batched(be, feeds[:batch], batch)  # warm-up (session, allocator) for both sizes
    embed_batched(be, feeds[:1], 1)
    times: dict[int, list[float]] = {1: [], batch: []}
    for _ in range(rounds):
        for b in (1, batch):
            t = time.perf_counter()
            embed_batched(be, feeds, b)
            times[b].append(time.perf_counter() - t)
    one, many = (n_tiles / statistics.median(times[b]) for b in (1, batch))
    return {"tiles": n_tiles, "batch": batch, "max_batch": be.info.max_batch, "tiles_per_s_batch1": one,
            "tiles_per_s_batchN": many, "speedup": many / one}


def prompt_rounds(export: str, size: int, n_boxes: int, cache_dir: Path) -> dict:
    from peft_export.data.objects import objects_from_labels
    from peft_export.runtime.segmenter import Segmenter

    image = mosaic(size)
    rng = np.random.default_rng(0)
    lab = np.zeros(image.shape, np.int32)
    for k, (y, x) in enumerate(rng.integers(20, size - 40, (n_boxes, 2))):
        lab[y: y + 20, x: x + 20] = k + 1
    boxes = objects_from_labels(lab).boxes
    filler = Segmenter(export, cache=cache_dir)
    t = time.perf_counter()
    plan = filler.set_image(image)  # what `peft-export embed` does
    t_embed = time.perf_counter() - t
    out = {"image": size, "tiles": len(plan.grid), "boxes": len(boxes), "embed_into_cache_s": t_embed}
    for name, cache in (("without_cache_s", None), ("with_cache_s", cache_dir)):
        seg = Segmenter(export, cache=cache)
        t = time.perf_counter()
        seg.set_image(image, lazy=True)
        seg.predict_labels(boxes=boxes)
        out[name] = time.perf_counter() - t
        if cache is not None:
            assert seg.cache_hit and seg._emb.computed == 0
    out["speedup"] = out["without_cache_s"] / out["with_cache_s"]
    return out


def folder_memory(export: str, counts: list[int], side: int, root: Path) -> dict:
    import tifffile

    image = mosaic(1024)
    boxes = root / "boxes.json"
    q = side // 4  # three boxes inside every image
    boxes.write_text(json.dumps([[q // 4, q // 4, q, q], [q, 2 * q, 2 * q, 3 * q], [2 * q, q, 3 * q, 2 * q]]))
    out = {"image": side}
    for n in counts:
        folder = root / f"images_{n}"
        folder.mkdir()
        for i in range(n):  # different content per image: a shifted window of the mosaic
            y, x = (37 * i) % (1024 - side), (53 * i) % (1024 - side)
            tifffile.imwrite(folder / f"img{i:03d}.tif", image[y: y + side, x: x + side])
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", FOLDER_WORKER, export, str(folder), str(root / f"out_{n}"),
                              str(boxes)], capture_output=True, text=True, check=True)
        rec = json.loads(res.stdout.strip().splitlines()[-1])
        rec["seconds"] = time.perf_counter() - t
        if rec["failed"] or rec["images"] != n:
            raise SystemExit(f"folder of {n}: {rec['failed']} image(s) failed; the memory figure would be meaningless")
        out[n] = rec
    return out


def make_export(root: Path) -> str:
    out = root / "lite_onnx"
    print("exporting zero-shot LiteMedSAM (fp32) ...", flush=True)
    cli = Path(sys.executable).with_name("peft-export")  # the installed CLI beside this interpreter
    subprocess.run([str(cli), "export", "lite_medsam", "-o", str(out), "--quiet"], check=True)
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", help="export folder (default: export zero-shot LiteMedSAM into a temp folder)")
    ap.add_argument("--batch", type=int, default=4, help="encoder batch to compare with batch 1")
    ap.add_argument("--tiles", type=int, default=16, help="tiles per throughput round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=2048, help="side of the large image for the cache figure")
    ap.add_argument("--boxes", type=int, default=50, help="box prompts per round")
    ap.add_argument("--folder-image", type=int, default=384, help="side of the folder benchmark's images")
    ap.add_argument("--json", action="store_true", help="also print all figures as JSON")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        export = args.export or make_export(root)
        print(f"CPU: {cpu_name()}; export: {export}", flush=True)
        thr = encoder_throughput(export, args.batch, args.tiles, args.rounds)
        print(f"encoder: {thr['tiles_per_s_batch1']:.2f} tiles/s at batch 1, {thr['tiles_per_s_batchN']:.2f} at "
              f"batch {args.batch}: x{thr['speedup']:.2f} ({thr['tiles']} tiles, median of {args.rounds})", flush=True)
        pr = prompt_rounds(export, args.size, args.boxes, root / "cache")
        print(f"second prompt round on a {pr['image']}x{pr['image']} image ({pr['tiles']} tiles, {pr['boxes']} boxes):"
              f" {pr['without_cache_s']:.2f} s without the cache, {pr['with_cache_s']:.2f} s with it: "
              f"x{pr['speedup']:.1f} (filling the cache: {pr['embed_into_cache_s']:.2f} s)", flush=True)
        mem = folder_memory(export, [5, 50], args.folder_image, root)
        a, b = mem[5], mem[50]
        side = args.folder_image
        print(f"predict on a folder of {side}x{side} images: peak RSS {a['peak_rss_mib']:.0f} MiB"
              f" for 5 images, {b['peak_rss_mib']:.0f} MiB for 50: ratio {b['peak_rss_mib'] / a['peak_rss_mib']:.3f}"
              f" ({a['seconds']:.1f} s / {b['seconds']:.1f} s)")
        bm = batch_memory(export, args.batch)
        one, many = bm[1]["peak_rss_mib"], bm[args.batch]["peak_rss_mib"]
        print(f"embedding tiles: peak RSS {one:.0f} MiB at batch 1, {many:.0f} MiB at batch {args.batch}: ratio "
              f"{many / one:.2f} (after loading the export: {bm[1]['after_loading_mib']:.0f} MiB)")
        if args.json:
            print(json.dumps({"cpu": cpu_name(), "encoder": thr, "cache": pr, "folder_memory": mem,
                              "batch_memory": bm}, indent=2))


if __name__ == "__main__":
    main()
