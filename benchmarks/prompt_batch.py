"""The prompt decoder batched over prompts: seconds per prompt at several batch sizes, measured interleaved.

    python benchmarks/prompt_batch.py EXPORT_DIR [--batches 1,4,16,32,64,128] [--prompts 128] [--rounds 3]

Runs ``decoder_lowres.onnx`` (one image embedding, B single-point prompts per call, no mask input: what the grid
and APG send) with ONNX Runtime on the CPU, the batch sizes interleaved round by round (the machine's drift hits
all alike), and prints seconds per prompt (median over rounds) and each batch size's ratio to batch 1. Also the
share of the decoder's time in each operator type (ONNX Runtime's profiler, at the largest batch): how much of it is
the per-prompt copy of the image embedding (``Expand``: SAM's ``repeat_interleave``) and how much the per-prompt
two-way transformer over the image tokens and the output upscaling, which no batching removes.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time

import numpy as np

from peft_export.bench.common import cpu_name


def feeds(session, emb: np.ndarray, b: int, rng) -> dict:
    s = 4 * emb.shape[-1]
    coords = np.concatenate([rng.random((b, 1, 2)) * s, np.zeros((b, 1, 2))], 1).astype(np.float32)
    return {"image_embeddings": emb, "point_coords": coords,
            "point_labels": np.tile(np.array([[1, -1]], np.float32), (b, 1)),
            "mask_input": np.zeros((b, 1, s, s), np.float32), "has_mask_input": np.zeros(b, np.float32)}


def op_shares(path: str, emb, b: int, rng) -> dict:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.log_severity_level = 3
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "decoder")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    for _ in range(2):
        sess.run(None, feeds(sess, emb, b, rng))
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    agg: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node":
            agg[e["args"].get("op_name", "?")] += e["dur"]
    total = sum(agg.values())
    return {k: round(v / total, 3) for k, v in agg.most_common(12)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export")
    ap.add_argument("--batches", default="1,4,16,32,64,128")
    ap.add_argument("--prompts", type=int, default=128, help="prompts decoded per batch size and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", help="write the JSON here too")
    args = ap.parse_args(argv)
    import onnxruntime as ort

    from peft_export.manifest import read_manifest
    from peft_export.runtime.onnx_backend import ort_session

    m = read_manifest(args.export)
    path = str(m.path_of(args.export, "decoder_lowres"))
    sess = ort_session(path)
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((1, *m.embedding)).astype(np.float32)
    batches = [int(b) for b in args.batches.split(",")]
    per: dict[int, list[float]] = {b: [] for b in batches}
    for b in batches:  # warm-up
        sess.run(None, feeds(sess, emb, b, rng))
    for _ in range(args.rounds):
        for b in batches:
            calls = max(1, args.prompts // b)
            f = feeds(sess, emb, b, rng)
            t0 = time.perf_counter()
            for _ in range(calls):
                sess.run(None, f)
            per[b].append((time.perf_counter() - t0) / (calls * b))
    base = statistics.median(per[batches[0]])
    result = {"cpu": cpu_name(), "cores": os.cpu_count(), "load_avg": os.getloadavg(), "export": args.export,
              "onnxruntime": ort.__version__, "rounds": args.rounds,
              "seconds_per_prompt": {b: round(statistics.median(v), 5) for b, v in per.items()},
              "ratio_to_batch_1": {b: round(statistics.median(v) / base, 3) for b, v in per.items()},
              "op_share_at_largest_batch": op_shares(path, emb, batches[-1], rng)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
