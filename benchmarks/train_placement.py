"""Training cost of LoRA placements on LiteMedSAM, with and without the frozen-trunk cache (CPU or CUDA).

For each case (placement all / late:50% / late:1, trunk cache off / on) a fresh subprocess builds LiteMedSAM with
the real weights + LoRA (rank 32), trains on the DSB2018 training tiles with the finetune recipe (fixed settings:
batch 1, 4 objects per image, 1 sub-iteration, alternating point/box prompts), runs one warm-up pass over the
three tiles (which also fills the cache), then times the next ``--steps`` steps. It reports the median step time,
the median time of the encoder forward pass inside the step, and the peak memory (CPU: the subprocess's peak RSS
and its increase over the state after set-up; CUDA: peak allocated). Each case runs in its own process so peak
RSS is not inherited from another case. All cases run in one invocation, one after another, and are printed as
ratios to ``all`` without the cache.

    python benchmarks/train_placement.py [--steps 3] [--device cpu] [--threads N] [--json]

``--threads`` sets torch's intra-op threads in every case (default: torch's default). On a small CPU shared
with other jobs, 1 thread gives steadier numbers (OpenMP threads waiting for a busy core dominate otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CASES = [("all", "off"), ("all", "memory"), ("late:50%", "off"), ("late:50%", "memory"), ("late:1", "off"),
         ("late:1", "memory")]

CHILD = r"""
import json, resource, sys, time
from peft_export._malloc import tune_malloc
tune_malloc()
import torch
torch.set_flush_denormal(True)
from peft_export.train import resolve_config
from peft_export.train.data import STREAM_IMAGE, rng_for
from peft_export.train.recipe import prompt_kind
from peft_export.train.trainer import Trainer, peak_memory_mb, set_train_mode

args = json.loads(sys.argv[1])
if args["threads"]:
    torch.set_num_threads(args["threads"])
cfg = resolve_config(cli_values=dict(model="lite_medsam", data="sample:dsb2018", peft="lora", rank=32,
                                     blocks=args["placement"], trunk_cache=args["cache"], iterations=100,
                                     batch_size=1, objects_per_image=4, sub_iterations=1, lr=1e-4,
                                     val_before=False, device=args["device"], precision="fp32"))
tr = Trainer(cfg, args["run_dir"], force=True)
tr.setup()
set_train_mode(tr.model)
enc_times = []
inner = tr.step_module.embed
def timed_embed(xs, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = inner(xs, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    enc_times.append(time.perf_counter() - t)
    return out
tr.step_module.embed = timed_embed
if tr.device.type == "cuda":
    torch.cuda.reset_peak_memory_stats(tr.device)
rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
n_warm = len(tr.data)  # one pass over the tiles: fills the cache
order = tr.data.epoch_order(0, 0, n_warm + args["steps"], 1)
step_times = []
for it in range(n_warm + args["steps"]):
    rng = rng_for(0, STREAM_IMAGE, 0, it, 0)
    view = tr.data.view(order[it], rng)
    t = time.perf_counter()
    tr._train_step([view], prompt_kind(it), [rng])
    if tr.device.type == "cuda":
        torch.cuda.synchronize()
    step_times.append(time.perf_counter() - t)
out = {"step_s": step_times[n_warm:], "encoder_s": enc_times[n_warm:], "warmup_step_s": step_times[:n_warm],
       "peak_mb": peak_memory_mb(tr.device), "setup_rss_mb": rss_setup,
       "cache": tr.cache.stats() if tr.cache is not None else tr.cache_note,
       "trainable_encoder": tr.counts["image_encoder"], "blocks": tr.peft_config.blocks}
print("RESULT " + json.dumps(out))
"""


def run_case(placement: str, cache: str, steps: int, device: str, run_dir: str, threads: int = 0) -> dict:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    arg = json.dumps({"placement": placement, "cache": cache, "steps": steps, "device": device,
                      "run_dir": run_dir, "threads": threads})
    proc = subprocess.run([sys.executable, "-c", CHILD, arg], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"case {placement}/{cache} failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per case (after one warm-up epoch)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--run-dir", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's default)")
    ap.add_argument("--json", action="store_true", help="print raw results as JSON")
    args = ap.parse_args()
    import tempfile

    scratch = args.run_dir or tempfile.mkdtemp(prefix="train_placement_")
    results = {}
    for placement, cache in CASES:
        print(f"running {placement:9s} cache {cache:6s} ...", file=sys.stderr, flush=True)
        results[(placement, cache)] = run_case(placement, cache, args.steps, args.device,
                                               os.path.join(scratch, f"{placement.replace(':', '_')}_{cache}"),
                                               args.threads)
    if args.json:
        print(json.dumps({f"{p}|{c}": r for (p, c), r in results.items()}, indent=2))
        return
    base = results[("all", "off")]
    b_step = statistics.median(base["step_s"])
    b_enc = statistics.median(base["encoder_s"])
    mem_kind = "peak RSS" if args.device == "cpu" else "peak allocated"
    b_mem = base["peak_mb"]
    b_inc = base["peak_mb"] - base["setup_rss_mb"] if args.device == "cpu" else b_mem
    print(f"LiteMedSAM + LoRA r32, DSB2018 train tiles, batch 1, 4 objects, 1 sub-iteration; device {args.device}; "
          f"median of {args.steps} steps after a warm-up epoch; threads {args.threads or 'torch default'}")
    print(f"{'placement':10s} {'cache':6s} {'blocks':>14s} {'step s':>7s} {'x all':>6s} {'enc fwd s':>9s} "
          f"{'x all':>6s} {mem_kind + ' MB':>17s} {'x all':>6s} {'train +MB':>9s} {'x all':>6s}")
    for (placement, cache), r in results.items():
        step = statistics.median(r["step_s"])
        enc = statistics.median(r["encoder_s"])
        inc = r["peak_mb"] - r["setup_rss_mb"] if args.device == "cpu" else r["peak_mb"]
        blocks = ",".join(map(str, r["blocks"])) if len(r["blocks"]) < 4 else f"{r['blocks'][0]}-{r['blocks'][-1]}"
        if cache != "off" and not isinstance(r["cache"], dict):  # asked for, but nothing frozen to cache
            cache = "n/a"
        print(f"{placement:10s} {cache:6s} {blocks:>14s} {step:7.2f} {step / b_step:6.2f} {enc:9.2f} "
              f"{enc / b_enc:6.2f} {r['peak_mb']:17.0f} {r['peak_mb'] / b_mem:6.2f} {inc:9.0f} {inc / b_inc:6.2f}")
    print("x all: ratio to placement 'all' without the cache, same run. enc fwd: the encoder part of the step's "
          "forward pass. train +MB: peak RSS minus RSS after set-up (model, data) — what training adds. "
          "cache n/a: the first encoder step trains, nothing to cache. LiteMedSAM's patch embedding and "
          "convolutional stage 0 hold no attention block, so even 'all' has a frozen trunk to cache.")


if __name__ == "__main__":
    main()
