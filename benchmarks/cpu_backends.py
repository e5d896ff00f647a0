"""CPU backends x precisions in ONE interleaved run: encoder latency (median/min, ratio to ONNX Runtime fp32), peak
memory, and box / point mean mask IoU vs the fp32 chain on the held-out DSB2018 tile and its 7 flips/rotations.

    python benchmarks/cpu_backends.py --lite LITE_FP32/ --lite-int8 LITE_INT8/ --vit-b VITB_FP32/
    python benchmarks/cpu_backends.py            # makes what is missing: zero-shot LiteMedSAM export (fp32; int8
                                                 # with --make-int8), SAM vit_b with random weights (--no-verify)
    python benchmarks/cpu_backends.py --table docs/bench_cpu_backends.json      # the README's markdown table

Cases (each model): ``ort_fp32`` (ONNX Runtime, the export's encoder), ``ort_int8_static`` (``export --precision
int8``: calibrated QDQ, gated; LiteMedSAM only), ``ov_f32``, ``ov_bf16`` (the whole encoder; what OpenVINO silently
runs on bf16 CPUs), ``ov_bf16_mixed`` (the CPU gate's split: one side f32, the rest bf16), ``ov_nncf_int8`` (the CPU
gate's NNCF int8 IR; with --nncf-all MODEL and no gated int8: every MatMul/Conv int8, not gated). bf16-mixed and NNCF
int8 come from ``cpu_gate.json`` beside the export (run ``peft-export cpu-gate`` first; else the case is skipped).

Latency: batch 1, every case called once per round, round-robin, after a warm-up; a pause after each ONNX Runtime
call (its intra-op threads spin). Peak memory: the process's peak RSS while a case is opened (compiled) and run once,
above the RSS before it (Linux ``clear_refs``), i.e. what the case itself adds.
Quality: the candidate encoder + the fp32 decoder (ONNX Runtime) vs the fp32 encoder + the same decoder (``ort_fp32``,
the reference), one box and one point per hand-drawn nucleus, on --gate-images inputs: the held-out tile, then its
flips/rotations (vit_b: random weights, so IoU measures agreement only). Writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ---- encoders -------------------------------------------------------------------------------------------

def open_case(case: str, folder: Path, int8_folder: Path | None, nncf_all: bool = False):
    """A callable x -> embedding for a case, or None when the case has no input here."""

    from peft_export.runtime.onnx_backend import ort_session

    if case.startswith("ort_"):
        src = folder if case == "ort_fp32" else int8_folder
        if src is None:
            return None
        if LOW_MEMORY:  # no memory arena: lower peak RSS (large models on a small shared machine)
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.enable_cpu_mem_arena = False
            opts.log_severity_level = 3
            sess = ort.InferenceSession(str(Path(src) / "encoder.onnx"), opts, providers=["CPUExecutionProvider"])
        else:
            sess = ort_session(str(Path(src) / "encoder.onnx"))
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: x})[0]

    from peft_export.export.cpu_gate import compiled_encoder
    from peft_export.manifest import read_manifest
    from peft_export.runtime.openvino_backend import _static_batch, read_gate_record, shared_core

    core = shared_core()
    cfg = {"PERFORMANCE_HINT": "LATENCY"}

    def model():
        m = core.read_model(str(folder / "encoder.onnx"))
        return _static_batch(m)

    if case in ("ov_f32", "ov_bf16"):
        c = core.compile_model(model(), "CPU", {**cfg, "INFERENCE_PRECISION_HINT": case[3:]})
        return compiled_encoder([c])
    record = read_gate_record(folder, read_manifest(folder, verify_files=False)) or {}
    entry = (record.get("precisions") or {}).get("bf16-mixed" if case == "ov_bf16_mixed" else "int8") or {}
    if entry.get("passed"):  # the runtime's own path: the OpenVINO backend at the gated precision
        from peft_export.runtime.openvino_backend import OpenVinoBackend

        be = OpenVinoBackend(folder, "bf16-mixed" if case == "ov_bf16_mixed" else "int8", cache="off")
        return be._run_encoder
    if case == "ov_bf16_mixed":
        return None
    if case == "ov_nncf_int8":
        if not nncf_all:
            return None
        import nncf

        from peft_export.export.calibration import calibration_sets
        from peft_export.export.nncf_int8 import quantize
        from peft_export.export.quantize import encoder_inputs

        m = read_manifest(folder, verify_files=False)
        cal = calibration_sets("sample:dsb2018", calibration_images=4, gate_images=1).calibration
        feeds = [x for x, _ in encoder_inputs(cal, m.preprocess_spec, bool(m.baked_preprocessing))]
        qm = quantize(nncf, model(), feeds, [], set())
        return compiled_encoder([core.compile_model(qm, "CPU", {**cfg, "INFERENCE_PRECISION_HINT": "f32"})])
    raise ValueError(case)


CASES = ("ort_fp32", "ort_int8_static", "ov_f32", "ov_bf16", "ov_bf16_mixed", "ov_nncf_int8")
LOW_MEMORY = False


# ---- quality --------------------------------------------------------------------------------------------

def quality(folder: Path, encoders: dict, gate_images: int = 8) -> dict:
    """Box / point mean (and min) mask IoU of each case vs the fp32 chain on the held-out tile and its flips."""
    from peft_export.export.calibration import calibration_sets
    from peft_export.export.cpu_gate import EncoderChain
    from peft_export.export.quantize import _Chain, _reference, gate_figures
    from peft_export.manifest import read_manifest
    from peft_export.runtime.onnx_backend import ort_session

    m = read_manifest(folder, verify_files=False)
    sets = calibration_sets("sample:dsb2018", calibration_images=1, gate_images=gate_images)
    dec = ort_session(str(m.path_of(folder, "decoder_lowres")))
    mask = tuple(m.mask_input_size)
    ref = _reference(_Chain(ort_session(str(m.path_of(folder, "encoder"))), dec, mask), sets, m.preprocess_spec,
                     bool(m.baked_preprocessing), bool(m.multimask), 16)
    out = {}
    for case, enc in encoders.items():
        if case == "ort_fp32":  # the reference itself
            continue
        f = gate_figures(EncoderChain(enc, dec, mask), ref)
        out[case] = {k: round(v, 4) if isinstance(v, float) else v for k, v in f.to_dict().items()}
        print(f"  quality {case}: box {f.box_mean:.4f} (min {f.box_min:.3f}), point {f.point_mean:.4f} "
              f"(min {f.point_min:.3f})", file=sys.stderr, flush=True)
    return out


# ---- latency (interleaved) and memory (one subprocess per case) -----------------------------------------

def latency(encoders: dict, x, rounds: int, pause: float) -> dict:
    times = {k: [] for k in encoders}
    for fn in encoders.values():  # warm-up
        fn(x)
    for r in range(rounds):
        for case, fn in encoders.items():
            t0 = time.perf_counter()
            fn(x)
            times[case].append(time.perf_counter() - t0)
            if case.startswith("ort_"):
                time.sleep(pause)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
              file=sys.stderr, flush=True)
    base = statistics.median(times["ort_fp32"])
    return {k: {"median_s": round(statistics.median(v), 4), "min_s": round(min(v), 4),
                "ratio_to_ort_fp32": round(statistics.median(v) / base, 3), "runs": [round(t, 4) for t in v]}
            for k, v in times.items()}


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def reset_peak() -> int:
    """Reset the process's peak RSS (Linux: ``clear_refs`` 5) and return the current RSS in KiB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_kib("VmRSS")


def peak_since(rss0_kib: int) -> float:
    """Peak RSS since :func:`reset_peak`, above the RSS at that moment, in MiB."""
    return round(max(_status_kib("VmHWM") - rss0_kib, 0) / 1024, 1)


# ---- exports that are missing ---------------------------------------------------------------------------

def make_export(kind: str, where: Path) -> Path:
    out = where / kind
    if kind == "lite_fp32":
        cmd = ["peft-export", "export", "lite_medsam", "-o", str(out), "-q", "--force"]
    elif kind == "lite_int8":
        cmd = ["peft-export", "export", "lite_medsam", "-o", str(out), "-q", "--force", "--precision", "int8"]
    else:  # SAM vit_b with random weights: the graph alone (the parity gate needs > 15 GB)
        code = ("import sys, torch; from peft_export.export import ExportOptions, export_model, prepare_for_export; "
                "from peft_export.loading import load_model; torch.manual_seed(0); "
                f"export_model(prepare_for_export(load_model('vit_b', require_weights=False)), {str(out)!r}, "
                "ExportOptions(verify=False, force=True))")
        cmd = [sys.executable, "-c", code]
    print(f"making {kind}: {' '.join(cmd[:4])} ...", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    return out


def cpu_description() -> dict:
    from peft_export.runtime.cpu import cpu_features

    f = cpu_features()
    return {"model": f["model"], "kind": f["kind"], "flags": f["flags"], "machine": platform.machine(),
            "cores": __import__("os").cpu_count()}


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for d in ("onnxruntime", "onnxruntime-gpu", "openvino", "nncf", "numpy"):
        try:
            out[d] = md.version(d)
        except md.PackageNotFoundError:
            pass
    return out


def run_model(name: str, folder: Path, int8_folder: Path | None, args) -> dict:
    import numpy as np

    from peft_export.manifest import read_manifest

    s = read_manifest(folder, verify_files=False).preprocess_spec.img_size
    x = np.random.default_rng(0).standard_normal((1, 3, s, s)).astype(np.float32)
    print(f"{name}: opening cases", file=sys.stderr, flush=True)
    encoders, skipped, mem = {}, {}, {}
    for case in (args.cases.split(",") if args.cases else CASES):
        rss0 = reset_peak()
        try:
            fn = open_case(case, folder, int8_folder, nncf_all=name in args.nncf_all.split(","))
            if fn is not None:
                fn(x)
        except Exception as exc:  # one case failing must not end the run
            skipped[case] = f"failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
            print(f"  {case}: {skipped[case]}", file=sys.stderr, flush=True)
            continue
        if fn is None:
            skipped[case] = "no input for this case (no int8 export / no passing cpu_gate.json entry)"
            continue
        mem[case] = peak_since(rss0)
        encoders[case] = fn
        print(f"  {case}: opened, peak +{mem[case]} MiB", file=sys.stderr, flush=True)
    print(f"{name}: latency, {args.rounds} interleaved rounds", file=sys.stderr, flush=True)
    lat = latency(encoders, x, args.rounds, args.pause)
    print(f"{name}: quality vs the fp32 chain", file=sys.stderr, flush=True)
    gate_images = args.vit_b_gate_images if name.startswith("vit_b") else args.gate_images
    qual = quality(folder, encoders, gate_images) if not args.no_quality else {}
    cases = {c: {**lat[c], "peak_rss_added_mib": mem.get(c), **({"quality": qual[c]} if c in qual else {})}
             for c in lat}
    return {"export": str(folder), "int8_export": str(int8_folder) if int8_folder else None, "input": [1, 3, s, s],
            "cases": cases, "skipped": skipped}


LABELS = {"ort_fp32": "ONNX Runtime fp32", "ort_int8_static": "ONNX Runtime int8 static (export --precision int8)",
          "ov_f32": "OpenVINO f32", "ov_bf16": "OpenVINO bf16 (whole encoder)",
          "ov_bf16_mixed": "OpenVINO bf16-mixed (gated split)", "ov_nncf_int8": "OpenVINO NNCF int8"}


def _iou(q: dict, kind: str) -> str:
    return f"{q[kind + '_mean_iou']:.3f} ({q[kind + '_min_iou']:.2f})" if q else ""


def markdown(result: dict) -> str:
    """The README's table from a result JSON."""
    cpu = result["cpu"]
    lines = [f"CPU: {cpu['model']} ({cpu['kind']}; {', '.join(cpu['flags'])}; {cpu['cores']} cores), "
             f"{result['rounds']} interleaved rounds, batch 1.", "",
             "| model | backend / precision | encoder median (min) | × ORT fp32 | peak RSS added | box IoU (min) | "
             "point IoU (min) |", "|---|---|--:|--:|--:|--:|--:|"]
    for name, r in result["models"].items():
        for case, c in r["cases"].items():
            q = c.get("quality") or {}
            box, point = (_iou(q, k) for k in ("box", "point")) if case != "ort_fp32" else ("reference",) * 2
            lines.append(f"| {name} | {LABELS.get(case, case)} | {c['median_s']:.2f} s ({c['min_s']:.2f}) | "
                         f"{c['ratio_to_ort_fp32']:.2f} | {c['peak_rss_added_mib']:.0f} MiB | {box} | "
                         f"{point} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--table":
        print(markdown(json.loads(Path(sys.argv[2]).read_text())))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lite", type=Path, help="LiteMedSAM fp32 export folder (default: zero-shot, made here)")
    ap.add_argument("--lite-int8", type=Path, help="LiteMedSAM `export --precision int8` folder")
    ap.add_argument("--make-int8", action="store_true", help="make the LiteMedSAM int8 export when not given")
    ap.add_argument("--vit-b", type=Path, help="SAM vit_b fp32 export folder (default: random weights, made here)")
    ap.add_argument("--models", default="lite_medsam,vit_b")
    ap.add_argument("--export", action="append", default=[], metavar="NAME=FP32_DIR[:INT8_DIR]",
                    help="measure these export folders instead (repeatable; NAME vit_b... is a label; quality uses "
                    "--vit-b-gate-images for names starting with vit_b)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pause", type=float, default=0.5, help="seconds after each ONNX Runtime call")
    ap.add_argument("--nncf-all", default="", help="models (lite_medsam,vit_b) whose ov_nncf_int8 case, when no "
                    "gated int8 is recorded, is NNCF int8 of every MatMul/Conv (not gated; 4 DSB2018 training tiles)")
    ap.add_argument("--gate-images", type=int, default=8, help="held-out tile + flips for quality (LiteMedSAM)")
    ap.add_argument("--vit-b-gate-images", type=int, default=4, help="held-out tile + flips for vit_b quality")
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--cases", default="", help="only these cases (comma-separated; ort_fp32 is the reference)")
    ap.add_argument("--low-memory", action="store_true", help="ONNX Runtime without its memory arena")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_cpu_backends.json")
    args = ap.parse_args(argv)
    global LOW_MEMORY
    LOW_MEMORY = args.low_memory
    cpu = cpu_description()
    print(f"CPU: {cpu['model']} ({cpu['kind']}; flags {' '.join(cpu['flags'])}; {cpu['cores']} cores)",
          file=sys.stderr, flush=True)
    result = {"cpu": cpu, "versions": versions(), "rounds": args.rounds, "models": {},
              "command": " ".join(sys.argv), "load_average_at_start": list(__import__("os").getloadavg())}
    with tempfile.TemporaryDirectory(prefix="cpu-backends-") as tmp:
        runs = []  # (name, fp32 folder, int8 folder)
        for spec in args.export:
            name, _, dirs = spec.partition("=")
            fp32, _, int8 = dirs.partition(":")
            runs.append((name, Path(fp32), Path(int8) if int8 else None))
        models = args.models.split(",") if not runs else []
        if "vit_b" in models:
            runs.append(("vit_b", args.vit_b or make_export("vit_b", Path(tmp)), None))
        if "lite_medsam" in models:
            lite = args.lite or make_export("lite_fp32", Path(tmp))
            lite_int8 = args.lite_int8 or (make_export("lite_int8", Path(tmp)) if args.make_int8 else None)
            runs.append(("lite_medsam", lite, lite_int8))
        for name, fp32, int8 in runs:
            result["models"][name] = run_model(name, fp32, int8, args)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")  # after each model: a partial result survives
    result["load_average_at_end"] = list(__import__("os").getloadavg())
    result["peak_rss_this_process_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nCPU: {cpu['model']} ({cpu['kind']})", file=sys.stderr)
    for name, r in result["models"].items():
        for case, c in r["cases"].items():
            q = c.get("quality") or {}
            print(f"{name:12s} {case:16s} median {c['median_s']:.3f}s min {c['min_s']:.3f}s "
                  f"x{c['ratio_to_ort_fp32']:.2f}  peak +{c['peak_rss_added_mib']} MiB  "
                  f"box {q.get('box_mean_iou', '-')} point {q.get('point_mean_iou', '-')}", file=sys.stderr)
    print(f"-> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
