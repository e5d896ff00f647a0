"""Effect of keeping freed memory in-process (peft_export._malloc) on SAM CPU inference.

Runs the same workload (LiteMedSAM image encoding + decoding 32 box prompts) in fresh processes with the tuning
on and off, alternating so machine drift hits both alike, and prints the median times and their ratio.

    python benchmarks/malloc_tuning.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKLOAD = r"""
import json, time
from peft_export._malloc import tune_malloc
applied = tune_malloc()
import numpy as np, torch
from peft_export.models import build_sam, get_spec
from peft_export.models.torch_backend import TorchBackend
be = TorchBackend(build_sam("lite_medsam"), get_spec("lite_medsam").preprocess)
x = np.random.default_rng(0).random((1, 3, 256, 256), dtype=np.float32)
c = np.random.default_rng(1).uniform(0, 200, (32, 2, 2)).astype(np.float32)
l = np.tile(np.array([[2, 3]], np.float32), (32, 1))
emb = be.embed(x); be.decode(emb, c, l)  # warm-up
t = time.perf_counter(); emb = be.embed(x); t_embed = time.perf_counter() - t
t = time.perf_counter(); be.decode(emb, c, l); t_decode = time.perf_counter() - t
print(json.dumps({"applied": applied, "embed": t_embed, "decode": t_decode}))
"""


def run(tuned: bool) -> dict:
    env = {**os.environ, "PEFT_EXPORT_MALLOC_TUNING": "1" if tuned else "0"}
    out = subprocess.run([sys.executable, "-c", WORKLOAD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    res = {True: [], False: []}
    for _ in range(args.rounds):
        for tuned in (False, True):
            res[tuned].append(run(tuned))
    for key in ("embed", "decode"):
        off = statistics.median(r[key] for r in res[False])
        on = statistics.median(r[key] for r in res[True])
        print(f"{key:7s} default malloc {off:7.2f} s   tuned {on:7.2f} s   speed-up x{off / on:.2f}")
    print(f"tuning applied: {all(r['applied'] for r in res[True])}")


if __name__ == "__main__":
    main()
