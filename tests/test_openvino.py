"""The OpenVINO backend (issue 22): f32 outputs vs ONNX Runtime, explicit precision, the CPU gate, --backend auto.

Tolerances (f32, both engines on the same fp32 ONNX graphs): embedding and logits max |diff| <= 1e-4 + 1e-4 * max|ref|
(the export parity gate's fp32 rule), IoU predictions <= 1e-4; masks (logits > 0) IoU >= 0.999 per prompt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("openvino")

from peft_export.errors import UsageError


def _close(a, b, atol=1e-4, rtol=1e-4) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    limit = atol + rtol * float(np.abs(b).max())
    diff = float(np.abs(a - b).max())
    assert diff <= limit, (diff, limit)
    return diff


def _backends(out_dir):
    from peft_export.runtime.onnx_backend import OnnxBackend
    from peft_export.runtime.openvino_backend import OpenVinoBackend

    return OpenVinoBackend(out_dir, "f32", cache="off"), OnnxBackend(out_dir)


def test_openvino_f32_matches_onnxruntime(tiny_export, rng):
    ov, ort = _backends(tiny_export.out_dir)
    assert ov.info.name == "openvino" and ov.info.compute == "f32" and ov.info.precision == "fp32"
    assert ov.info.details["cpu"]["model"]
    s = ov.info.img_size
    x = rng.standard_normal((2, 3, s, s)).astype(np.float32)  # two images: one encoder call each
    emb_ov, emb_ort = ov.embed(x), ort.embed(x)
    _close(emb_ov, emb_ort)
    coords = np.array([[[10, 12], [40, 50]], [[30, 30], [0, 0]]], np.float32)
    labels = np.array([[2, 3], [1, -1]], np.float32)
    for mask_input in (None, rng.standard_normal((2, 1, *ov.info.mask_input_size)).astype(np.float32)):
        lo_ov, iou_ov = ov.decode(emb_ort[:1], coords, labels, mask_input)
        lo_ort, iou_ort = ort.decode(emb_ort[:1], coords, labels, mask_input)
        _close(lo_ov, lo_ort)
        _close(iou_ov, iou_ort, rtol=0)


def test_segmenter_openvino_masks_match(tiny_export, rng):
    from peft_export.metrics import mask_ious
    from peft_export.runtime import Segmenter

    image = (rng.random((90, 120)) * 255).astype(np.uint8)
    boxes = [[5, 5, 60, 50], [40, 30, 110, 85]]
    outs = {}
    for name in ("openvino", "onnxruntime"):
        seg = Segmenter(tiny_export.out_dir, backend=name)
        seg.set_image(image)
        outs[name] = seg.predict(boxes=boxes)
    assert (mask_ious(outs["openvino"].masks, outs["onnxruntime"].masks) >= 0.999).all()
    _close(outs["openvino"].scores, outs["onnxruntime"].scores, rtol=0)


def test_precision_choice_is_explicit():
    from peft_export.runtime.openvino_backend import choose_precision

    passed = {"threshold": 0.97, "precisions": {
        "bf16": {"passed": False, "box_mean_iou": 0.96, "point_mean_iou": 0.9},
        "bf16-mixed": {"passed": True, "latency_ratio": 0.6}, "int8": {"passed": True, "latency_ratio": 0.8}}}
    assert choose_precision("auto", None, True)[0] == "f32"
    assert choose_precision("auto", passed, True)[0] == "bf16-mixed"  # the fastest passed option
    assert choose_precision("auto", passed, False)[0] == "int8"  # no bf16 arithmetic: bf16 options are out
    assert choose_precision("f32", passed, True)[0] == "f32"
    with pytest.raises(UsageError, match="failed this export's CPU gate"):
        choose_precision("bf16", passed, True)
    with pytest.raises(UsageError, match="has not been gated"):
        choose_precision("bf16", None, True)
    with pytest.raises(UsageError, match="no bf16 arithmetic"):
        choose_precision("bf16-mixed", passed, False)
    # an export with an instance decoder: a record that did not gate automatic segmentation runs nothing reduced
    old = {"threshold": 0.97, "precisions": {"bf16": {"passed": True, "latency_ratio": 0.4}}}
    assert choose_precision("auto", old, True, instance=False)[0] == "bf16"
    ran, why = choose_precision("auto", old, True, instance=True)
    assert ran == "f32" and "re-run peft-export cpu-gate" in why
    with pytest.raises(UsageError, match="re-run `peft-export cpu-gate EXPORT --precisions bf16`"):
        choose_precision("bf16", old, True, instance=True)
    new = {"threshold": 0.97, "precisions": {"bf16": {"passed": True, "latency_ratio": 0.4,
                                                      "instance_matched_iou": 0.98}}}
    assert choose_precision("auto", new, True, instance=True)[0] == "bf16"


def test_gate_refuses_a_precision_that_fails_it(tiny_export, tmp_path):
    """An impossible threshold (IoU can never exceed 1): bf16 and bf16-mixed must fail, be recorded as failed,
    and never run: an explicit request is refused with one line, auto runs f32."""
    import shutil

    from peft_export.export.cpu_gate import CpuGateOptions, run_cpu_gate
    from peft_export.runtime.openvino_backend import GATE_FILE, OpenVinoBackend

    out = tmp_path / "export"
    shutil.copytree(tiny_export.out_dir, out)
    opts = CpuGateOptions.model_construct(**{**CpuGateOptions().model_dump(), "iou": 1.01, "gate_images": 1,
                                             "gate_objects": 4, "rounds": 1, "calibration_images": 2,
                                             "precisions": ("bf16", "bf16-mixed", *_int8())})
    record = run_cpu_gate(out, opts)
    assert (out / GATE_FILE).is_file()
    assert record["precisions"] and not any(r["passed"] for r in record["precisions"].values())
    if record["cpu"]["bf16"]:  # the candidates ran and were measured
        assert 0 <= record["precisions"]["bf16"]["box_mean_iou"] <= 1
    for precision in ("bf16", *_int8()):
        with pytest.raises(UsageError, match="CPU gate"):
            OpenVinoBackend(out, precision, cache="off")
    assert not list(out.glob("encoder.nncf_int8.*"))  # a failed int8 leaves no file
    be = OpenVinoBackend(out, "auto", cache="off")
    assert be.info.compute == "f32" and be.precision_run == "f32"


def _int8() -> tuple[str, ...]:
    import importlib.util

    return ("int8",) if importlib.util.find_spec("nncf") else ()


def test_gated_precisions_run_close_to_f32(tiny_export, tmp_path, rng):
    """A reachable threshold (0.5 on this random-weight model): what passed runs, reads back what it computes, and
    stays close to f32 on an input unlike the calibration images (embedding relative error: bf16 <= 3%, 8 mantissa
    bits; int8 <= 15%, 8-bit ranges calibrated on microscopy tiles, tested here on noise)."""
    import shutil

    from peft_export.export.cpu_gate import CpuGateOptions, run_cpu_gate
    from peft_export.runtime.openvino_backend import OpenVinoBackend

    out = tmp_path / "export"
    shutil.copytree(tiny_export.out_dir, out)
    record = run_cpu_gate(out, CpuGateOptions(precisions=("bf16", *_int8()), iou=0.5, gate_images=1, gate_objects=4,
                                              rounds=1, calibration_images=2))
    cache = tmp_path / "ov-cache"  # f32 compiled into the cache first, then each reduced precision from it
    f32 = OpenVinoBackend(out, "f32", cache=cache)
    x = rng.standard_normal((1, 3, f32.info.img_size, f32.info.img_size)).astype(np.float32)
    ref = f32.embed(x)
    assert np.array_equal(ref, OpenVinoBackend(out, "f32", cache="off").embed(x))
    passed = [p for p, r in record["precisions"].items() if r.get("passed")]
    assert passed or (not record["cpu"]["bf16"] and not _int8())
    for precision in passed:
        for where in ("off", cache):  # OpenVINO's cache key ignores the inference precision: a bf16 compile
            # loaded the f32 blob and computed NaN (OpenVINO 2026.4, AMX); one cache folder per precision
            be = OpenVinoBackend(out, precision, cache=where)
            assert be.info.compute == {"bf16": "bf16", "int8": "int8+f32"}[precision]
            err = float(np.linalg.norm(be.embed(x) - ref) / np.linalg.norm(ref))
            assert 0 < err <= {"bf16": 0.03, "int8": 0.15}[precision], (precision, where, err)  # > 0: ran reduced
    auto = OpenVinoBackend(out, "auto", cache="off")
    if passed:
        fastest = min(passed, key=lambda p: record["precisions"][p]["latency_ratio"])
        assert auto.precision_run == fastest


def test_cpu_gate_cli_refuses_bad_options(tiny_export, run_cli):
    code, _, err = run_cli("cpu-gate", str(tiny_export.out_dir), "--iou", "1.5")
    assert code == 2 and "--iou" in err
    code, _, err = run_cli("cpu-gate", str(tiny_export.out_dir), "--precisions", "fp8")
    assert code == 2 and "fp8" in err


def test_predict_summary_records_backend_and_cpu(tiny_export, tmp_path, run_cli):
    import tifffile

    image = tmp_path / "img.tif"
    tifffile.imwrite(image, (np.random.default_rng(0).random((60, 80)) * 255).astype(np.uint8))
    (tmp_path / "boxes.json").write_text("[[5, 5, 40, 30]]")
    code, out, err = run_cli("predict", str(tiny_export.out_dir), str(image), "--boxes", str(tmp_path / "boxes.json"),
                             "-o", str(tmp_path / "labels.tif"), "--backend", "openvino", "--json")
    assert code == 0, err
    runtime = json.loads(out)["runtime"]
    assert runtime["backend"] == "openvino" and runtime["compute"] == "f32" and runtime["cpu"]["flags"]


def test_backend_auto_without_openvino_falls_back(tiny_export, tmp_path):
    """`--backend auto` in a process where importing openvino fails (as on an install without the extra): ONNX
    Runtime runs, and the summary says so."""
    import tifffile

    image = tmp_path / "img.tif"
    tifffile.imwrite(image, (np.random.default_rng(0).random((60, 80)) * 255).astype(np.uint8))
    (tmp_path / "boxes.json").write_text("[[5, 5, 40, 30]]")
    code = f"""
import importlib.abc, importlib.util, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "openvino":
            raise ImportError("blocked: openvino")
sys.meta_path.insert(0, Block())
_find = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] == "openvino" else _find(name, *a)
from peft_export_cli.app import main
code = main(["predict", {str(tiny_export.out_dir)!r}, {str(image)!r}, "--boxes", {str(tmp_path / "boxes.json")!r},
             "-o", {str(tmp_path / "labels.tif")!r}, "--backend", "auto", "--json"])
assert code == 0, code
assert "openvino" not in sys.modules
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PEFT_EXPORT_NO_COLOR": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)
    assert summary["backend"] == "onnxruntime" and summary["runtime"]["backend"] == "onnxruntime"
    assert "OpenVINO is not installed" in out.stderr  # said which and why
    # and explicitly asking for it without the package: one line naming the extra
    from peft_export.runtime import openvino_backend

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "openvino", None)
        with pytest.raises(Exception, match=r"peft-export\[openvino\]"):
            openvino_backend.import_openvino()


@pytest.mark.slow
def test_openvino_evaluate_matches_onnxruntime_on_real_model(lite_export_fp32, run_cli):
    """Real LiteMedSAM (LoRA-merged export), held-out DSB2018 tile: OpenVINO f32 and ONNX Runtime evaluate to the
    same mean IoU (box and point) within 0.002."""
    reports = {}
    for backend in ("onnxruntime", "openvino"):
        code, out, err = run_cli("evaluate", str(lite_export_fp32.out_dir), "--backend", backend, "--json", "-q",
                                 *(("--inference-precision", "f32") if backend == "openvino" else ()))
        assert code == 0, err
        reports[backend] = json.loads(out)
    assert reports["openvino"]["backend"] == "openvino" and reports["openvino"]["compute"] == "f32"
    for kind in ("box", "point"):
        a, b = (reports[k]["results"][kind] for k in ("openvino", "onnxruntime"))
        assert a["objects"] == b["objects"] > 20
        assert abs(a["mean_iou"] - b["mean_iou"]) <= 0.002, (kind, a, b)


def test_registry_auto_choice_and_precision_flag(tiny_export, monkeypatch):
    """The registry: `auto` takes OpenVINO for an fp32 export on a CPU, passes over it for a reduced-precision
    export (its gate ran with ONNX Runtime) and says why; --inference-precision with another backend is refused."""
    from dataclasses import replace

    from peft_export.manifest import read_manifest
    from peft_export.runtime import backends
    from peft_export.runtime.backends import RuntimeOptions, choose_backend, open_model

    monkeypatch.setattr(backends, "_ort_has_cuda", lambda: False)  # a CPU machine, whatever this one has
    folder = tiny_export.out_dir
    m = read_manifest(folder)
    assert choose_backend(folder, m, "auto")[0] == "openvino"
    name, why = choose_backend(folder, replace(m, precision="int8"), "auto")
    assert name == "onnxruntime" and "int8 export" in why
    assert backends.auto_passes_over("openvino", replace(m, precision="fp16"))
    monkeypatch.setattr(backends, "_ort_has_cuda", lambda: True)
    assert choose_backend(folder, m, "auto")[0] == "onnxruntime"  # a GPU with ONNX Runtime CUDA
    assert choose_backend(folder, m, "openvino") == ("openvino", "asked for")  # asked for: runs
    be = open_model(folder, RuntimeOptions(backend="openvino", inference_precision="f32", openvino_cache="off"))
    assert be.info.details["chosen"] == "asked for" and be.info.compute == "f32" and be.info.max_batch == 1
    with pytest.raises(UsageError, match="--inference-precision f32 applies to the OpenVINO backend"):
        open_model(folder, RuntimeOptions(backend="onnxruntime", inference_precision="f32"))
    with pytest.raises(UsageError, match="--inference-precision"):
        RuntimeOptions.parse({"inference_precision": "fp8"})


_CTRL_C_AFTER_MODELS = """
import faulthandler, gc, os, signal, sys, time
faulthandler.enable()  # like pytest and python -X faulthandler: the main thread has an alternate signal stack
from peft_export.runtime.openvino_backend import OpenVinoBackend
first = OpenVinoBackend(sys.argv[1], "f32", cache="off")
second = OpenVinoBackend(sys.argv[1], "f32", cache="off")
del first; gc.collect()  # freed out of the order they were made, as a cpu-gate or a napari session does
del second; gc.collect()
signal.signal(signal.SIGINT, signal.default_int_handler)
try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
except KeyboardInterrupt:
    print("stopped cleanly")
"""


def test_ctrl_c_after_many_openvino_models_still_stops_cleanly(tiny_export):
    """Each openvino.Core gives the compiling thread an alternate signal stack and unmaps it when freed; with one Core
    per backend, two backends freed out of order left the main thread on unmapped memory and the next Ctrl-C died of
    SIGSEGV (seen in this suite). The backends share one Core, so Ctrl-C still raises KeyboardInterrupt."""
    done = subprocess.run([sys.executable, "-c", _CTRL_C_AFTER_MODELS, str(tiny_export.out_dir)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "stopped cleanly" in done.stdout, (done.returncode, done.stderr[-2000:])


def test_a_candidate_not_run_is_recorded_as_skipped_not_failed():
    """bf16-mixed is not searched when bf16 of the whole encoder passes: recorded (and shown by `cpu-gate`) as
    skipped with its reason, never as passed."""
    from types import SimpleNamespace

    from peft_export.export.cpu_gate import gate_mixed

    ctx = SimpleNamespace(threshold=0.97, encoder_model=lambda: pytest.fail("the split search must not run"))
    r = gate_mixed(ctx, SimpleNamespace(value=0.98), rounds=1)
    assert r["skipped"] and not r["passed"] and "not needed" in r["reason"]


def test_cache_keeps_each_inference_precision_apart(lite_export_fp32, tmp_path, rng):
    """The real LiteMedSAM encoder compiled at f32 into a cache folder, then at bf16 from the same folder: the bf16
    compile must not load the f32 blob (OpenVINO's cache key ignores the inference precision; it did, and computed
    NaN while reporting bf16). Oracle: the same bf16 compile without a cache."""
    from peft_export.runtime.openvino_backend import OpenVinoBackend, bf16_capable, shared_core

    if not bf16_capable(shared_core()):
        pytest.skip("this CPU has no bf16 arithmetic (AVX512-BF16 or AMX): OpenVINO cannot compile bf16 here")
    cache = tmp_path / "cache"
    be = OpenVinoBackend(lite_export_fp32.out_dir, "f32", cache=cache)
    x = rng.random((1, 3, be.info.img_size, be.info.img_size), dtype=np.float32)
    encoder = be.manifest.path_of(be.out_dir, "encoder")
    f32 = np.asarray(be._compile(encoder, "f32", batch1=True)(x)[0])
    uncached = OpenVinoBackend(lite_export_fp32.out_dir, "f32", cache="off")
    want = np.asarray(uncached._compile(encoder, "bf16", batch1=True)(x)[0])
    got = np.asarray(be._compile(encoder, "bf16", batch1=True)(x)[0])
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert 0 < np.linalg.norm(got - f32) / np.linalg.norm(f32) < 0.1  # it ran bf16, and close to f32
    assert sorted(p.name for p in cache.iterdir()) == ["bf16", "f32"]


def test_gate_holds_automatic_segmentation_to_the_threshold_too(inst_export, tmp_path):
    """An export with an instance decoder: each candidate's record carries the instance labels' matched IoU vs the
    fp32 chain (AIS), and the gate value is the smallest of box, point and instance; the reference labels match
    themselves exactly and a perturbed embedding's do not (the figure can fail)."""
    import shutil

    from peft_export.export.cpu_gate import CpuFigures, CpuGateOptions, entry, run_cpu_gate
    from peft_export.export.quantize import GateFigures

    out = tmp_path / "export"
    shutil.copytree(inst_export.out_dir, out)
    record = run_cpu_gate(out, CpuGateOptions(precisions=("bf16", *_int8()), iou=0.5, gate_images=2, gate_objects=4,
                                              rounds=1, calibration_images=2))
    ran = [r for r in record["precisions"].values() if "box_mean_iou" in r]
    if not ran:
        pytest.skip("no candidate can run on this CPU (no bf16 arithmetic, NNCF not installed)")
    assert "instance labels" in record["rule"]
    for r in ran:
        assert 0 <= r["instance_min_matched_iou"] <= r["instance_matched_iou"] <= 1
        assert r["gate_value"] == min(r["box_mean_iou"], r["point_mean_iou"], r["instance_matched_iou"])
    good = GateFigures(0.99, 0.95, 0.99, 0.95, 0.01, 8)
    assert entry(CpuFigures(good), 0.97)["passed"]
    assert not entry(CpuFigures(good, 0.9, 0.8), 0.97)["passed"]  # box and point pass, automatic does not


def test_instance_reference_matches_itself_and_sees_a_change(inst_export):
    from types import SimpleNamespace

    from peft_export.data.dataset import dsb2018_tiles
    from peft_export.export.calibration import CalImage
    from peft_export.export.cpu_gate import InstanceReference
    from peft_export.export.quantize import _Chain, _reference
    from peft_export.manifest import read_manifest
    from peft_export.runtime.onnx_backend import ort_session

    m = read_manifest(inst_export.out_dir)
    tile = dsb2018_tiles("val")[0]
    sets = SimpleNamespace(gate=[CalImage(tile.image, tile.labels, "tile")])
    chain = _Chain(ort_session(m.path_of(inst_export.out_dir, "encoder")),
                   ort_session(m.path_of(inst_export.out_dir, "decoder_lowres")), tuple(m.mask_input_size))
    ref = _reference(chain, sets, m.preprocess_spec, bool(m.baked_preprocessing), bool(m.multimask), 4)
    inst = InstanceReference(ort_session(m.path_of(inst_export.out_dir, "instance_decoder")), ref)
    assert inst.labels[0].max() > 0
    assert inst.matched(ref.embeddings) == [1.0]
    shifted = [np.roll(e, 3, axis=-1) for e in ref.embeddings]
    assert inst.matched(shifted)[0] < 1.0
