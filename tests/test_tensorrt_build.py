"""`peft-export build-engine` end to end against a SIMULATED TensorRT, and the real-GPU tests.

ORCHESTRATION ONLY: the ``test_orchestration_*`` tests use ``trt_sim.SimTRT``/``SimCuda`` (stand-ins for the parts
of the TensorRT Python API and cuda-python our code calls, as we read NVIDIA's documentation) to check our build
flow: flags, profiles, timing cache, progress, atomic publishing, the parity gate, engine.json, batch splitting.
They cannot catch a misreading of TensorRT's API or any TensorRT behaviour. The ``tensorrt``/``gpu``-marked tests
at the end build and run real engines; they skip here with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from trt_sim import INSTALL, H, S, SimTRT, install_sim, listing, make_synthetic_export

from peft_export.errors import MissingDependencyError, UsageError
from peft_export.export import tensorrt as te
from peft_export.runtime import tensorrt_backend as rt
from peft_export.runtime import tensorrt_env as trt_env


@pytest.fixture
def synthetic(tmp_path) -> Path:
    return make_synthetic_export(tmp_path / "export")


@pytest.fixture
def sim(monkeypatch):
    return install_sim(monkeypatch)


def _build(synthetic, run_cli, tmp_path):
    cache = tmp_path / "cache.bin"
    code, out, err = run_cli("build-engine", str(synthetic), "--json", "--max-points", "6", "--opt-batch", "2",
                             "--max-batch", "4", "--min-batch", "2", "--timing-cache", str(cache))
    assert code == 0, err
    return json.loads(out), cache


def test_orchestration_build_and_publish(synthetic, sim, run_cli, tmp_path):
    meta, cache = _build(synthetic, run_cli, tmp_path)
    assert json.loads((synthetic / "engine.json").read_text()) == meta
    assert meta["tensorrt_version"] == "10.99.0-sim" and meta["gpu"]["name"] == "NVIDIA SimGPU"
    assert meta["gpu"]["compute_capability"] == "8.6" and meta["precision"] == "fp32" and meta["verified"]
    assert {e["precision"] for e in meta["engines"].values()} == {"fp32"}
    p = meta["parity"]
    assert p["passed"] and p["embedding_max_abs_diff"] == 0 and p["masks_max_abs_diff"] == 0 and p["mask_iou"] == 1
    assert {"1 point", "4 points", "6 points", "4 points + mask_input", "1 point x batch 4"} == set(p["prompt_sets"])
    dec = meta["engines"]["decoder"]
    assert dec["profile"]["point_coords"] == {"min": [2, 1, 2], "opt": [2, 4, 2], "max": [4, 6, 2]}
    assert meta["engines"]["encoder"]["profile"] == {}
    assert meta["trtexec"]["decoder"].startswith("trtexec --onnx=decoder_lowres.onnx --saveEngine=decoder.engine")
    assert "--maxShapes=point_coords:4x6x2" in meta["trtexec"]["decoder"]
    # what reached the (simulated) builder: strongly typed, fp32 without TF32, the workspace, the profile
    b_enc, b_dec = sim.trt.builds
    assert b_enc["flags"] == 1 << 5 and b_enc["config_flags"] == [] and b_enc["workspace"] == 4 << 30
    assert b_dec["profile"]["point_labels"] == [[2, 1], [2, 4], [4, 6]]
    assert cache.read_bytes() == b"+encoder.onnx+decoder_lowres.onnx"  # one cache threaded through both builds
    from peft_export.files import stray_files

    assert not stray_files(synthetic)  # the build's temporary folder is gone


def test_orchestration_backend_runs_published_engines(synthetic, sim, run_cli, tmp_path):
    """The backend on the published engines: ONNX Runtime's numbers, batches split (B > 4) and padded (B < 2)."""
    from peft_export.runtime.onnx_backend import OnnxBackend
    from peft_export.runtime.segmenter import Segmenter

    _build(synthetic, run_cli, tmp_path)
    trt_b, ort_b = rt.TensorRTBackend(synthetic), OnnxBackend(synthetic)
    x = np.random.default_rng(1).normal(size=(1, 3, S, S)).astype(np.float32)
    emb = trt_b.embed(x)
    np.testing.assert_array_equal(emb, ort_b.embed(x))
    rng = np.random.default_rng(2)
    for b, n in ((9, 3), (1, 2), (4, 6)):
        coords = rng.uniform(0, S, (b, n, 2)).astype(np.float32)
        labels = np.ones((b, n), np.float32)
        mi = rng.normal(size=(b, 1, 4 * H, 4 * H)).astype(np.float32)
        for mask_input in (None, mi):
            low, iou = trt_b.decode(emb, coords, labels, mask_input)
            ref_low, ref_iou = ort_b.decode(emb, coords, labels, mask_input)
            assert low.shape == (b, 4, 4 * H, 4 * H) and iou.shape == (b, 4)
            np.testing.assert_array_equal(low, ref_low)
            np.testing.assert_array_equal(iou, ref_iou)
    with pytest.raises(UsageError, match=r"7 points .* built for 1 to 6 points.*--max-points 7"):
        trt_b.decode(emb, np.zeros((1, 7, 2), np.float32), np.ones((1, 7), np.float32))
    image = (np.random.default_rng(3).random((40, 30)) * 255).astype(np.uint8)  # as predict/evaluate use it
    seg_t, seg_o = Segmenter(trt_b), Segmenter(ort_b)
    for seg in (seg_t, seg_o):
        seg.set_image(image)
    boxes = [[2, 3, 20, 30], [5, 5, 25, 35]]
    np.testing.assert_array_equal(seg_t.predict(boxes=boxes).masks, seg_o.predict(boxes=boxes).masks)
    trt_b.close()


def test_orchestration_force_and_failed_gate_keep_old_engines(synthetic, sim, run_cli, tmp_path):
    _build(synthetic, run_cli, tmp_path)
    before = listing(synthetic)
    code, _, err = run_cli("build-engine", str(synthetic))
    assert code == 2 and "already exists; pass --force" in err
    sim.trt = SimTRT(noise=0.5)
    code, _, err = run_cli("build-engine", str(synthetic), "--force")
    assert code == 1 and "do not match ONNX Runtime" in err and "nothing was written" in err
    assert listing(synthetic) == before
    sim.trt = SimTRT(version="10.99.1-sim")  # --force with a passing build replaces them
    code, _, err = run_cli("build-engine", str(synthetic), "--force", "-q")
    assert code == 0, err
    assert json.loads((synthetic / "engine.json").read_text())["tensorrt_version"] == "10.99.1-sim"


def test_orchestration_progress_is_reported_by_the_library(synthetic, sim):
    """build_engines names and counts its own steps (the CLI's bar only mirrors them)."""
    for verify in (True, False):
        opts = te.EngineOptions(verify=verify)
        prepared = te.preflight(synthetic, opts, force=True)
        heard: list[tuple] = []
        te.build_engines(synthetic, opts, force=True, prepared=prepared,
                         progress=lambda *args, heard=heard: heard.append(args))
        steps = prepared.plan.steps
        assert len(steps) == (5 if verify else 4) and ("comparing with ONNX Runtime" in steps) == verify
        assert heard == [(name, i, len(steps)) for i, name in enumerate(steps)] + [("done", len(steps), len(steps))]


def test_orchestration_precision_gates_and_trt11(synthetic, sim, run_cli):
    # fp16 from an fp32 export on TensorRT 10: BuilderFlag.FP16, gated on mask IoU
    code, out, err = run_cli("build-engine", str(synthetic), "--precision", "fp16", "--json")
    assert code == 0, err
    meta = json.loads(out)
    assert meta["precision"] == "fp16" and "BuilderFlag.FP16" in meta["build_mode"]
    assert "mask IoU" in meta["parity"]["gate"] and "--fp16" in meta["trtexec"]["encoder"]
    assert sim.trt.builds[0]["flags"] == 0 and 2 in sim.trt.builds[0]["config_flags"]
    # a small offset moves few mask pixels: fp16 passes its IoU gate, an fp32 build fails its max |diff| gate
    sim.trt = SimTRT(noise=0.01)
    code, _, err = run_cli("build-engine", str(synthetic), "--precision", "fp16", "--force", "-q")
    assert code == 0, err
    code, _, err = run_cli("build-engine", str(synthetic), "--force", "-q")
    assert code == 1 and "tolerance 0.001" in err
    # --tf32 leaves TensorRT's default TF32 on; that fp32 engine is then gated on mask IoU, not max |diff|
    sim.trt = SimTRT(noise=0.01)
    code, out, err = run_cli("build-engine", str(synthetic), "--tf32", "--force", "--json")
    assert code == 0, err
    assert "mask IoU" in json.loads(out)["parity"]["gate"] and sim.trt.builds[0]["config_flags"] == [1]
    # each gate looks at the masks, not only at the embedding
    sim.trt = SimTRT(noise=0.5, noisy=("low_res_masks",))  # 0.5 on logits reaching ~60: ~1e-2 relative
    code, _, err = run_cli("build-engine", str(synthetic), "--force", "-q")
    assert code == 1 and "the masks differ" in err and "the embedding" not in err
    sim.trt = SimTRT(noise=-2.5, noisy=("low_res_masks",))
    code, _, err = run_cli("build-engine", str(synthetic), "--precision", "fp16", "--force", "-q")
    assert code == 1 and "mask IoU" in err and "< 0.99" in err
    # TensorRT 11 (no builder precision flags): fp16 needs an fp16 export
    sim.trt = SimTRT(version="11.0.0-sim", weak=False)
    before = listing(synthetic)
    code, _, err = run_cli("build-engine", str(synthetic), "--precision", "fp16", "--force")
    assert code == 2 and "strongly typed" in err and "--precision fp16" in err
    assert listing(synthetic) == before


def test_orchestration_fp16_export_on_trt11(tmp_path, sim, run_cli):
    out = make_synthetic_export(tmp_path / "fp16", precision="fp16")  # graph is fp32; the manifest says fp16
    sim.trt = SimTRT(version="11.0.0-sim", weak=False)
    code, stdout, err = run_cli("build-engine", str(out), "--json")
    assert code == 0, err
    meta = json.loads(stdout)
    assert meta["precision"] == "fp16" and meta["build_mode"].startswith("strongly typed")
    # TensorRT 11: always strongly typed, so neither the deprecated creation flag nor --stronglyTyped/--fp16;
    # BuilderFlag.TF32 still exists there, so TF32 stays off for the fp32 islands
    enc = meta["trtexec"]["encoder"]
    assert "--stronglyTyped" not in enc and "--fp16" not in enc and "--noTF32" in enc
    assert [b["flags"] for b in sim.trt.builds] == [0, 0] and all(b["config_flags"] == [] for b in sim.trt.builds)
    # the same export on TensorRT 10: strongly typed by the creation flag, no precision builder flag
    sim.trt = SimTRT(version="10.99.0-sim")
    code, stdout, err = run_cli("build-engine", str(out), "--json", "--force")
    assert code == 0, err
    assert "--stronglyTyped" in json.loads(stdout)["trtexec"]["encoder"]
    assert [b["flags"] for b in sim.trt.builds] == [1 << 5, 1 << 5]


def test_orchestration_no_verify_is_recorded(synthetic, sim, run_cli):
    code, out, err = run_cli("build-engine", str(synthetic), "--no-verify", "--json")
    assert code == 0, err
    meta = json.loads(out)
    assert meta["verified"] is False and meta["parity"] == {"skipped": True}


# ---- real TensorRT on a real GPU (skip here) -------------------------------------------------------------------

def _gpu_skip_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return f"TensorRT is not installed ({INSTALL}; needs an NVIDIA GPU)"
    try:
        trt_env.environment()
    except MissingDependencyError as exc:
        return str(exc)
    return None


_GPU_SKIP = _gpu_skip_reason()
needs_gpu = pytest.mark.skipif(_GPU_SKIP is not None, reason=str(_GPU_SKIP))


@pytest.fixture(scope="module")
def real_export(tiny_export) -> Path:
    """The session's shared vit_tiny export (tests/conftest.py); tests must not write into it."""
    return Path(getattr(tiny_export, "out_dir", tiny_export))


def _median_iou(low: np.ndarray, ref: np.ndarray) -> float:
    """IoU of masks thresholded at the reference's median: never empty, so the IoU can fail."""
    t = float(np.median(ref))
    a, b = low > t, ref > t
    return float(np.logical_and(a, b).sum() / np.logical_or(a, b).sum())


def _export_vit_tiny(out: Path, precision: str) -> None:
    import torch

    from peft_export.export import ExportOptions, Thresholds, export_model, prepare_for_export
    from peft_export.export.quantize import Int8Options
    from peft_export.loading import load_model

    torch.manual_seed(0)
    # int8: the TensorRT layout (symmetric int8 Q/DQ); random weights, so no quality gate, only the engine's
    export_model(prepare_for_export(load_model("vit_tiny", require_weights=False)), out,
                 ExportOptions(precision=precision, thresholds=Thresholds(int8_iou=0.0),
                               int8=Int8Options(target="tensorrt", calibration_images=4, gate_images=2)))


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", ["fp32", "fp16-flag", "fp16-export", "int8-export"])
def test_real_tensorrt_build_run_and_refuse(real_export, tmp_path, run_cli, case):
    """Real engines: fp32; fp16 through BuilderFlag.FP16 (TensorRT 10 only); fp16 from an fp16 export (strongly
    typed, TensorRT 10 and 11); int8 from the export's int8 (static Q/DQ encoder when symmetric, else refused).
    Compared with ONNX Runtime on the same graphs; then a foreign engine.json is refused."""
    from peft_export.runtime.onnx_backend import OnnxBackend

    out = tmp_path / "export"
    if case in ("fp16-export", "int8-export"):
        _export_vit_tiny(out, case.split("-")[0])
    else:
        shutil.copytree(real_export, out)
    code, stdout, err = run_cli("build-engine", str(out), *(["--precision", "fp16"] if case == "fp16-flag" else []),
                                "--max-points", "8", "--json")
    if case == "fp16-flag" and not trt_env.tensorrt_capabilities(trt_env.import_tensorrt())["weak_typing"]:
        assert code == 2 and "strongly typed" in err, err  # TensorRT 11: refused, with what to do instead
        return
    if case == "int8-export" and code == 2:  # an export whose int8 TensorRT cannot build: refused, one line
        assert "TensorRT" in err and len(err.strip().splitlines()) == 1, err
        pytest.skip(f"this export's int8 is not TensorRT's: {err.strip()}")
    assert code == 0, err
    meta = json.loads(stdout)
    assert meta["parity"]["passed"] and meta["verified"]
    assert meta["tensorrt_version"] == trt_env.import_tensorrt().__version__
    trt_b, ort_b = rt.TensorRTBackend(out), OnnxBackend(out)
    x = np.random.default_rng(0).normal(size=(1, 3, *(2 * [ort_b.info.img_size]))).astype(np.float32)
    emb_t, emb_o = trt_b.embed(x), ort_b.embed(x)
    coords = np.random.default_rng(1).uniform(0, ort_b.info.img_size, (5, 3, 2)).astype(np.float32)
    labels = np.ones((5, 3), np.float32)
    low_t, _ = trt_b.decode(emb_o, coords, labels)  # the decoder alone
    low_o, _ = ort_b.decode(emb_o, coords, labels)
    if case == "fp32":  # TF32 off: fp32-exact up to summation order
        np.testing.assert_allclose(emb_t, emb_o, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(low_t, low_o, rtol=1e-3, atol=1e-3)
    elif case == "int8-export":  # int8 encoder, fp32 decoder
        np.testing.assert_allclose(low_t, low_o, rtol=1e-3, atol=1e-3)
        assert _median_iou(trt_b.decode(emb_t, coords, labels)[0], low_o) >= 0.9
    else:
        assert _median_iou(low_t, low_o) >= 0.98
    trt_b.close()
    meta["gpu"] = {**meta["gpu"], "name": "NVIDIA Some Other GPU"}
    (out / "engine.json").write_text(json.dumps(meta))
    with pytest.raises(UsageError, match="rebuild both here"):
        rt.TensorRTBackend(out)
