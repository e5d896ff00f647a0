"""`peft-export benchmark train|infer`: result schema, ratios, plots and the skip-with-reason path, on tiny models.

Timings themselves are never asserted (machines are noisy); what is checked is that every case is measured,
ratios are computed against the named baseline from the same run, skipped cases carry a reason, and the
files a user reads (results.json, results.csv, PNG) are complete.
"""

from __future__ import annotations

import csv
import json
import os

import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _read(result_dir):
    results = json.loads((result_dir / "results.json").read_text())
    with open(result_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return results, rows


def _encoder_trainables(model: str, placement: str) -> int:
    """Independent count: a fresh model with LoRA applied directly (not through the trainer)."""
    from peft_export.models.registry import build_sam
    from peft_export.peft import PeftConfig, apply_peft

    sam = build_sam(model)
    for p in sam.parameters():
        p.requires_grad_(False)
    apply_peft(sam, PeftConfig("lora", placement, {"rank": 4}), model)
    return sum(p.numel() for p in sam.image_encoder.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    """One small run: 2 placements that fit tinyvit_tiny (4 attention blocks) and one that does not."""
    from peft_export_cli.app import main

    out = tmp_path_factory.mktemp("bench") / "train"
    code = main(["benchmark", "train", "--model", "tinyvit_tiny", "--methods", "lora", "--rank", "4",
                 "--placements", "all,late:1,late:9", "--steps", "2", "--warmup", "1", "--no-memory", "-o", str(out)])
    return code, out


def test_train_results_schema_and_ratios(train_run):
    code, out = train_run
    assert code == 0
    results, rows = _read(out)
    assert results["kind"] == "train"
    for key in ("cpu", "python", "torch"):
        assert key in json.dumps(results["machine"]), key
    assert results["settings"]["baseline"] == "lora all"
    assert results["settings"]["steps"] == 2 and results["settings"]["model"] == "tinyvit_tiny"
    cases = {c["case"]: c for c in results["cases"]}
    assert list(cases) == ["lora all", "lora late:1", "lora late:9"]
    base = cases["lora all"]
    assert base["step_vs_baseline"] == 1.0
    for name in ("lora all", "lora late:1"):
        c = cases[name]
        assert c["step_median_s"] > 0 and c["step_min_s"] <= c["step_median_s"]
        assert c["step_vs_baseline"] == pytest.approx(c["step_median_s"] / base["step_median_s"], rel=0.01, abs=2e-3)
        assert c["loss_first"] > 0 and c["loss_last"] > 0
    # trainable parameters agree with LoRA applied to a fresh model, and a late placement trains fewer
    for name, placement in (("lora all", "all"), ("lora late:1", "late:1")):
        assert cases[name]["trainable_encoder_params"] == _encoder_trainables("tinyvit_tiny", placement)
    assert cases["lora late:1"]["trainable_encoder_params"] < base["trainable_encoder_params"]
    assert cases["lora late:1"]["blocks"] != base["blocks"]
    # CSV carries the same cases
    assert [r["case"] for r in rows] == list(cases)


def test_train_unfit_placement_is_skipped_with_reason(train_run):
    _, out = train_run
    results, rows = _read(out)
    skipped = next(c for c in results["cases"] if c["case"] == "lora late:9")
    assert "4" in skipped["skipped"] and "block" in skipped["skipped"], skipped
    assert "step_median_s" not in skipped
    assert next(r for r in rows if r["case"] == "lora late:9")["skipped"] == skipped["skipped"]


def test_train_plot_is_a_png(train_run):
    _, out = train_run
    png = out / "train.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000


def test_train_cuda_unavailable_is_a_skip_not_a_crash(tmp_path, run_cli):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the no-CUDA path cannot be exercised")
    code, out, err = run_cli("benchmark", "train", "--model", "tinyvit_tiny", "--placements", "late:1",
                             "--device", "cuda", "--steps", "1", "--no-memory", "-o", str(tmp_path / "r"), "--json")
    # nothing was measured: a failure with the reasons, and the record of what was skipped is still written
    assert code == 1 and "nothing was measured" in err and "CUDA is not available" in err, err
    case = json.loads(out)["cases"][0]
    assert "CUDA is not available" in case["skipped"]
    assert json.loads((tmp_path / "r" / "results.json").read_text())["cases"][0]["skipped"] == case["skipped"]
    assert (tmp_path / "r" / "train.png").read_bytes()[:8] == PNG_MAGIC


def test_train_memory_is_measured_in_a_fresh_process(tmp_path, run_cli):
    import numpy as np

    from peft_export.bench.common import current_rss_mib

    ballast = np.ones(600 * 2**20 // 8)  # the parent holds 600 MiB more than a worker needs: it must not count
    parent_rss = current_rss_mib()
    code, out, err = run_cli("benchmark", "train", "--model", "tinyvit_tiny", "--placements", "late:1",
                             "--methods", "lora", "--rank", "4", "--steps", "1", "--warmup", "0", "-o",
                             str(tmp_path / "r"), "--json")
    assert code == 0, err
    case = json.loads(out)["cases"][0]
    # peak RSS of the isolated worker: at least what the process held after set-up, and a real process size
    assert case["peak_memory_mib"] >= case["setup_memory_mib"] > 50
    assert case["train_memory_mib"] == pytest.approx(case["peak_memory_mib"] - case["setup_memory_mib"], abs=0.2)
    assert case["memory_vs_baseline"] == 1.0
    assert case["peak_memory_mib"] < parent_rss - 300, (case, parent_rss)
    del ballast


@pytest.mark.parametrize("args, expected", [
    (["--methods", "lorra"], "unknown PEFT method 'lorra'"),
    (["--placements", "late:x"], "placement"),
    (["--model", "vit_q"], "unknown model 'vit_q'"),
    (["--steps", "0"], "--steps"),
    (["--device", "tpu"], "--device"),
])
def test_train_bad_options(tmp_path, run_cli, args, expected):
    code, _out, err = run_cli("benchmark", "train", "--model", "tinyvit_tiny", *args, "-o", str(tmp_path / "r"))
    assert code != 0
    assert expected in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_existing_result_dir_needs_force(tmp_path, run_cli):
    res = tmp_path / "r"
    res.mkdir()
    (res / "results.json").write_text("keep me")
    code, _, err = run_cli("benchmark", "train", "--model", "tinyvit_tiny", "--placements", "late:1",
                           "--steps", "1", "--no-memory", "-o", str(res))
    assert code != 0 and "--force" in err
    assert (res / "results.json").read_text() == "keep me"


# ---- inference ----------------------------------------------------------------------------------------------

def test_infer_benchmark_cases_ratios_and_skips(lite_export_fp32, run_cli, tmp_path):
    """A merged LoRA export: PyTorch unmerged / merged / vanilla, ONNX Runtime fp32, TensorRT skipped with reason."""
    out = tmp_path / "infer"
    code, stdout, err = run_cli("benchmark", "infer", str(lite_export_fp32.out_dir), "--backends",
                                "torch,onnxruntime,tensorrt", "--precisions", "fp32", "--runs", "2", "--warmup", "0",
                                "--prompts", "4", "--baseline", "torch merged", "--no-memory", "-o", str(out), "--json")
    assert code == 0, err
    results, rows = _read(out)
    assert json.loads(stdout)["cases"] == results["cases"]
    cases = {(c["backend"], c["variant"]): c for c in results["cases"]}
    assert set(cases) == {("torch", "unmerged"), ("torch", "merged"), ("torch", "vanilla"),
                          ("onnxruntime", "merged"), ("tensorrt", "merged")}
    base = cases[("torch", "merged")]
    assert results["settings"]["baseline"] == base["case"]
    assert base["encoder_vs_baseline"] == 1.0 and base["mask_iou_vs_baseline"] == 1.0
    for key in ("unmerged", "merged", "vanilla"):
        c = cases[("torch", key)]
        for part in ("encoder", "decoder_1", "decoder_4"):
            assert 0 < c[f"{part}_median_ms"] <= c[f"{part}_p90_ms"] <= c[f"{part}_p99_ms"]
            assert c[f"{part}_vs_baseline"] == pytest.approx(c[f"{part}_median_ms"] / base[f"{part}_median_ms"],
                                                             rel=0.01)
    # the same model three ways gives the same masks: unmerged PEFT vs merged (torch), merged vs its ONNX export
    assert cases[("torch", "unmerged")]["mask_iou_vs_baseline"] >= 0.99
    assert cases[("onnxruntime", "merged")]["mask_iou_vs_baseline"] >= 0.98
    trt = cases[("tensorrt", "merged")]
    assert "encoder_median_ms" not in trt and ("TensorRT" in trt["skipped"] or "build-engine" in trt["skipped"])
    assert [r["case"] for r in rows] == [c["case"] for c in results["cases"]]
    assert (out / "latency.png").read_bytes()[:8] == PNG_MAGIC


def test_infer_that_measures_nothing_fails_with_the_reasons(tiny_export, run_cli, tmp_path):
    """Every case skipped (an fp32 export, only int8 asked for; no TensorRT engines): exit 1, reasons, record."""
    out = tmp_path / "infer"
    code, _, err = run_cli("benchmark", "infer", str(tiny_export.out_dir), "--backends", "onnxruntime,tensorrt",
                           "--precisions", "int8", "--runs", "1", "--no-memory", "-o", str(out))
    assert code == 1 and "nothing was measured" in err and "not asked for" in err, err
    results, _ = _read(out)
    assert all("skipped" in c for c in results["cases"]) and (out / "latency.png").is_file()


# ---- the one-shot GPU check (benchmarks/gpu_check.sh): only its CPU paths run here ------------------------------

def test_gpu_check_dry_run_writes_every_part_with_its_reason(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "gpu.json"
    proc = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh"), "--cpu-dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["kind"] == "gpu_check" and report["dry_run"] is True
    assert report["environment"]["torch"] and report["environment"]["cpu"]
    assert list(report["parts"]) == ["tests", "train", "encoder", "onnxruntime", "tensorrt"]
    for name, part in report["parts"].items():
        assert part["status"] == "skipped" and part["reason"], (name, part)


def test_gpu_check_encoder_part_on_cpu(tmp_path):
    """The measuring code of the encoder part (run on a GPU by the script) on a CPU with vit_tiny: merged and
    unmerged LoRA give the same embedding; both are timed."""
    import sys
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    ctx = gpu_check.Ctx(device="cpu", dry_run=False, deadline=time.monotonic() + 300, work=tmp_path,
                        model="vit_tiny", runs=2)
    part = gpu_check.run_part("encoder", ctx)
    assert part["status"] == "ok", part
    fp32 = part["fp32"]
    assert fp32["unmerged_ms"] > 0 and fp32["merged_ms"] > 0
    assert fp32["max_abs_diff"] <= 1e-4 * max(1.0, fp32["max_abs_reference"])
    assert "bf16" not in part  # bf16 is measured on CUDA only
    dry = gpu_check.run_part("encoder", gpu_check.Ctx(device="cpu", dry_run=True, deadline=time.monotonic() + 60,
                                                      work=tmp_path))
    assert dry["status"] == "skipped"


def test_gpu_check_backend_timing_on_cpu(tiny_export):
    """The ONNX Runtime / TensorRT parts' measuring helpers, on ONNX Runtime's CPU provider: the figures and
    outputs come from the export (embedding of the manifest's shape, one low-res mask per box prompt)."""
    import sys
    from pathlib import Path

    from peft_export.runtime.onnx_backend import OnnxBackend

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    backend = OnnxBackend(tiny_export.out_dir, providers=["CPUExecutionProvider"])
    x, coords, labels = gpu_check._sample_inputs(backend.info.img_size)
    figures, (emb, low) = gpu_check._backend_figures(backend, x, coords, labels, "cpu", 2)
    assert figures["encoder_ms"] > 0 and figures["decoder_ms"] > 0
    assert emb.shape == (1, *backend.info.embedding_shape) and low.shape[0] == len(coords) == 16
    assert gpu_check._diff(emb, backend.embed(x)) == 0.0


def test_infer_bad_inputs(tmp_path, run_cli):
    code, _, err = run_cli("benchmark", "infer", str(tmp_path), "-o", str(tmp_path / "r"))
    assert code != 0 and "manifest" in err and "Traceback" not in err
    code, _, err = run_cli("benchmark", "infer", str(tmp_path), "--backends", "tflite", "-o", str(tmp_path / "r"))
    assert code != 0 and "tflite" in err
    assert not (tmp_path / "r").exists()
