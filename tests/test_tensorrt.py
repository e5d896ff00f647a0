"""`peft-export build-engine` without TensorRT: planning, refusals, trtexec lines, engine.json checks.

TensorRT cannot be installed on our development/CI machines and they have no GPU, so these files check what can
be checked without them, and nothing here shows that TensorRT itself builds or runs our engines:

- the refusal paths (no TensorRT / no cuda-python / no CUDA GPU -> one line, exit 2, nothing written);
- the trtexec command lines generated from a REAL vit_tiny export (the profile shapes are fed to the ONNX graph
  with ONNX Runtime, an independent check that the graph accepts them);
- the optimisation-profile shapes derived from --min/opt/max-points and --min/opt/max-batch, and option errors;
- precision selection for TensorRT 10 vs 11 (feature detection) and the engine.json compatibility/integrity
  check (another GPU model or TensorRT version refused with what to rebuild) on synthetic metadata;
- the argument types our code passes to the real cuda-python (installed here; every call fails without a GPU).

The build flow against a SIMULATED TensorRT is in ``test_tensorrt_build.py`` (our logic only, see
``trt_sim.py``), int8 / Q/DQ in ``test_tensorrt_int8.py``.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from trt_sim import INSTALL, SimCuda, SimTRT, install_sim, listing, make_synthetic_export
from trt_sim import one_line as _one_line

from peft_export.errors import DataError, MissingDependencyError, UsageError, VerificationError
from peft_export.export import tensorrt as te
from peft_export.manifest import Manifest, file_entry, read_manifest
from peft_export.runtime import tensorrt_backend as rt
from peft_export.runtime import tensorrt_env as trt_env


@pytest.fixture
def synthetic(tmp_path) -> Path:
    return make_synthetic_export(tmp_path / "export")


@pytest.fixture
def sim(monkeypatch):
    return install_sim(monkeypatch)


# ---- a real export (vit_tiny, random weights, fp32), made once -------------------------------------------------

@pytest.fixture(scope="module")
def real_export(request, tmp_path_factory) -> Path:
    """The shared session export ``tiny_export`` (tests/conftest.py) when there is one, else one
    ``export_model`` run for this module (parity gate off: the export's gate is tested with the exporter).
    Tests must not write into it."""
    try:
        shared = request.getfixturevalue("tiny_export")
    except pytest.FixtureLookupError:
        shared = None
    if shared is not None:
        return Path(getattr(shared, "out_dir", shared))
    import torch

    from peft_export.export import ExportOptions, export_model, prepare_for_export
    from peft_export.loading import load_model

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("real_export") / "export"
    export_model(prepare_for_export(load_model("vit_tiny", require_weights=False)), out, ExportOptions(verify=False))
    return out


# ---- refusal paths (exit 2, one line, nothing written) ---------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_refuses_without_tensorrt(synthetic, run_cli):
    """The real environment of this machine: no TensorRT."""
    before = listing(synthetic)
    code, _, err = run_cli("build-engine", str(synthetic))
    assert code == 2, err
    assert "TensorRT is not installed" in err and INSTALL in err and _one_line(err), err
    assert listing(synthetic) == before


def test_refuses_without_gpu(synthetic, sim, run_cli):
    """TensorRT present (simulated), cuda-python reporting no driver/no device."""
    sim.cuda = SimCuda(devices=0)
    before = listing(synthetic)
    code, _, err = run_cli("build-engine", str(synthetic))
    assert code == 2, err
    assert "no CUDA GPU available" in err and "no NVIDIA driver" in err and INSTALL in err and _one_line(err), err
    assert listing(synthetic) == before


def test_refuses_without_cuda_python_or_old_tensorrt(synthetic, sim, monkeypatch, run_cli):
    before = listing(synthetic)
    sim.trt = SimTRT(version="8.6.1", strongly_typed=False)  # no STRONGLY_TYPED: TensorRT 8
    code, _, err = run_cli("build-engine", str(synthetic))
    assert code == 2 and "TensorRT 8.6.1 is too old" in err and INSTALL in err and _one_line(err), err
    sim.trt = SimTRT()

    def missing():
        raise MissingDependencyError(f"cuda-python is not installed (sim): {INSTALL}")

    monkeypatch.setattr(trt_env, "import_cudart", missing)
    code, _, err = run_cli("build-engine", str(synthetic))
    assert code == 2 and "cuda-python is not installed" in err and _one_line(err), err
    assert listing(synthetic) == before


def test_real_cuda_bindings_without_gpu():
    """The real cuda-python (installed here with torch) on a machine without a GPU: our calls are accepted with
    these argument types and report the missing GPU as a MissingDependencyError."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        pytest.skip("cuda-python (cuda.bindings) is not installed")
    err, count = cudart.cudaGetDeviceCount()[:2]
    if int(err) == 0 and count:
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(MissingDependencyError, match=r"no CUDA GPU available"):
        trt_env.cuda_device(cudart)
    a = np.zeros(4, np.float32)
    h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
    stream = cudart.cudaStream_t()
    assert isinstance(int(stream), int)  # what EngineRunner passes to execute_async_v3
    for result in (cudart.cudaMalloc(16), cudart.cudaStreamCreate(),
                   cudart.cudaMemcpyAsync(0, a.ctypes.data, 16, h2d, stream), cudart.cudaStreamSynchronize(stream),
                   cudart.cudaFree(0)):
        assert int(result[0]) != 0  # an error code, not a TypeError: the signatures fit
    with pytest.raises(Exception, match=r"CUDA call cudaMalloc failed: cuda"):
        trt_env.cuda_call(cudart, cudart.cudaMalloc(16), "cudaMalloc")


def test_tensorrt_modules_do_not_import_torch():
    code = ("import sys, peft_export.runtime.tensorrt_backend, peft_export.export.tensorrt, "
            "peft_export.export.tensorrt.build, peft_export.export.tensorrt.verify; "
            "assert 'torch' not in sys.modules, 'torch imported'; assert 'tensorrt' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_bad_options_are_clear(synthetic, run_cli):
    before = listing(synthetic)
    for args, msg in [(("--min-points", "5", "--opt-points", "4"), "--min-points 5 > --opt-points 4"),
                      (("--opt-points", "20"), "--opt-points 20 > --max-points 16"),
                      (("--min-batch", "0"), "at least 1"),
                      (("--opt-batch", "128"), "--opt-batch 128 > --max-batch 64"),
                      (("--workspace", "lots"), "cannot read size 'lots'"),
                      (("--precision", "fp8"), "--precision: unknown value 'fp8'; choose from fp32, fp16, int8")]:
        code, _, err = run_cli("build-engine", str(synthetic), *args)
        assert code == 2 and msg in err, (args, err)
        code, _, err = run_cli("build-engine", str(synthetic), "--print-trtexec", *args)
        assert code == 2 and msg in err, (args, err)
    assert listing(synthetic) == before


def test_parse_size():
    assert te.parse_size("4GiB") == 4 << 30
    assert te.parse_size("512MiB") == 512 << 20
    assert te.parse_size("2G") == 2 * 10**9
    assert te.parse_size("4096") == 4096 << 20
    assert te.parse_size("1.5GiB") == 3 << 29
    for bad in ("", "GiB", "-1GiB", "4XB", "100KiB"):
        with pytest.raises(UsageError):
            te.parse_size(bad)


# ---- profiles ----------------------------------------------------------------------------------------------

def _dec_inputs(b="B", n="N"):
    T = te.TensorSpec
    return [T("image_embeddings", [1, 256, 64, 64], "float32"), T("point_coords", [b, n, 2], "float32"),
            T("point_labels", [b, n], "float32"), T("mask_input", [b, 1, 256, 256], "float32"),
            T("has_mask_input", [b], "float32")]


def _dyn(specs):
    return [te.TensorSpec(t.name, [d if isinstance(d, int) else None for d in t.dims], t.dtype) for t in specs]


def test_decoder_profile_from_options():
    opts = te.EngineOptions(min_points=2, opt_points=3, max_points=10, min_batch=1, opt_batch=8, max_batch=32)
    prof = te.decoder_profile(_dyn(_dec_inputs()), opts)
    assert "image_embeddings" not in prof  # static: needs no profile
    assert prof["point_coords"] == {"min": [1, 2, 2], "opt": [8, 3, 2], "max": [32, 10, 2]}
    assert prof["point_labels"] == {"min": [1, 2], "opt": [8, 3], "max": [32, 10]}
    assert prof["mask_input"] == {"min": [1, 1, 256, 256], "opt": [8, 1, 256, 256], "max": [32, 1, 256, 256]}
    assert prof["has_mask_input"] == {"min": [1], "opt": [8], "max": [32]}
    # a decoder exported with a fixed batch of 1 keeps it
    fixed = te.decoder_profile(_dyn(_dec_inputs(b=1)), opts)
    assert fixed["point_coords"] == {"min": [1, 2, 2], "opt": [1, 3, 2], "max": [1, 10, 2]}
    assert "mask_input" not in fixed
    # an axis we cannot bound is an error, not a guess
    weird = _dyn(_dec_inputs())
    weird[0] = te.TensorSpec("image_embeddings", [1, 256, None, 64], "float32")
    with pytest.raises(DataError, match="dynamic axis 2"):
        te.decoder_profile(weird, opts)


def test_encoder_profile():
    assert te.encoder_profile([te.TensorSpec("image", [1, 3, 1024, 1024], "float32")], 1024) == {}
    baked = te.encoder_profile([te.TensorSpec("image", [None, None, 3], "uint8")], 1024)
    assert baked == {"image": {"min": [1, 1, 3], "opt": [1024, 1024, 3], "max": [1024, 1024, 3]}}


# ---- precision: TensorRT 10 (builder flags) vs 11 (strongly typed), by capabilities -------------------------

def _manifest(precision):
    return SimpleNamespace(precision=precision)


def graphs(enc_ops=("MatMul", "Softmax"), qdq=0, issues=()) -> dict:
    """role -> GraphFacts as read_onnx would report them (``qdq``: Q/DQ nodes in the encoder)."""
    enc = te.GraphFacts("encoder.onnx", [], [], set(enc_ops), qdq, set(issues))
    return {"encoder": enc, "decoder": te.GraphFacts("decoder_lowres.onnx", [], [], {"MatMul"})}


TRT10 = {"version": "10.7.0", "weak_typing": True, "strongly_typed_flag": True, "tf32_flag": True}
TRT11 = {"version": "11.0.0", "weak_typing": False, "strongly_typed_flag": True, "tf32_flag": True}


def test_precision_resolution():
    g = graphs()
    assert te.resolve_precision(_manifest("fp32"), None, g, TRT10)[:2] == ("fp32", "strong")
    assert te.resolve_precision(_manifest("fp32"), "fp16", g, TRT10)[:2] == ("fp16", "weak-fp16")
    assert te.resolve_precision(_manifest("fp16"), None, g, TRT11)[:2] == ("fp16", "strong")
    assert te.resolve_precision(_manifest("fp16"), "fp16", g, TRT10).engines == {"encoder": "fp16",
                                                                                 "decoder": "fp16"}
    with pytest.raises(UsageError, match=r"strongly typed .*--precision fp16"):
        te.resolve_precision(_manifest("fp32"), "fp16", g, TRT11)
    with pytest.raises(UsageError, match="needs an fp32 export"):
        te.resolve_precision(_manifest("fp16"), "fp32", g, TRT10)
    with pytest.raises(UsageError, match="unknown precision 'bf16'"):
        te.resolve_precision(_manifest("bf16"), None, g, TRT10)
    # unknown TensorRT (--print-trtexec without TensorRT): the TensorRT 10 route, with a note about 11
    prec, mode, notes, _ = te.resolve_precision(_manifest("fp32"), "fp16", g, None)
    assert (prec, mode) == ("fp16", "weak-fp16") and "TensorRT 11" in notes[0]


def test_capabilities_by_feature_detection():
    assert trt_env.tensorrt_capabilities(SimTRT(weak=True))["weak_typing"] is True
    caps = trt_env.tensorrt_capabilities(SimTRT(version="11.0.0", weak=False))
    assert caps["weak_typing"] is False and caps["strongly_typed_flag"] is True and caps["tf32_flag"] is True
    # a version string alone decides nothing
    assert trt_env.tensorrt_capabilities(SimTRT(version="11.0.0", weak=True))["weak_typing"] is True
    assert trt_env.tensorrt_capabilities(SimTRT(version="8.6.1", strongly_typed=False))["strongly_typed_flag"] is False


# ---- trtexec lines from a real export -----------------------------------------------------------------------

def _parse(line: str) -> dict[str, str]:
    argv = shlex.split(line)
    assert argv[0] == "trtexec"
    return dict(a[2:].split("=", 1) if "=" in a else (a[2:], "") for a in argv[1:])


def _shapes(value: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(d) for d in v.split("x")) for k, v in (item.rsplit(":", 1) for item in value.split(","))}


def test_trtexec_lines_from_real_export(real_export, run_cli, tmp_path):
    import onnxruntime as ort

    manifest = read_manifest(real_export)
    assert manifest.precision == "fp32"
    before = listing(real_export)
    cache = tmp_path / "trt.cache"
    code, out, err = run_cli("build-engine", str(real_export), "--print-trtexec", "--max-points", "8",
                             "--opt-batch", "4", "--max-batch", "8", "--timing-cache", str(cache),
                             "--workspace", "2GiB")
    assert code == 0, err
    assert listing(real_export) == before and not cache.exists()  # a dry run writes nothing
    lines = [ln for ln in out.splitlines() if ln.startswith("trtexec")]
    assert len(lines) == 2
    enc, dec = (_parse(ln) for ln in lines)
    assert enc["onnx"] == str(real_export / "encoder.onnx") and enc["saveEngine"] == str(real_export / "encoder.engine")
    assert dec["onnx"] == str(real_export / "decoder_lowres.onnx")
    assert dec["saveEngine"] == str(real_export / "decoder.engine")
    for args in (enc, dec):
        assert args["memPoolSize"] == "workspace:2048" and args["timingCacheFile"] == str(cache.resolve())
        # fp32 export, fp32 engine: strongly typed (TensorRT 10 opt-in), no precision flag, TF32 off
        assert "stronglyTyped" in args and "noTF32" in args and "skipInference" in args and "fp16" not in args
    if not manifest.baked_preprocessing:  # the encoder's batch axis: tiles 1..--encoder-batch (default 4), opt 4
        s = int(manifest.preprocess_spec.img_size)
        assert [_shapes(enc[k])["image"] for k in ("minShapes", "optShapes", "maxShapes")] == [
            (1, 3, s, s), (4, 3, s, s), (4, 3, s, s)]
    # the profile against the graph itself: ONNX Runtime runs the decoder at the min and max shapes
    sess = ort.InferenceSession(str(real_export / "decoder_lowres.onnx"), providers=["CPUExecutionProvider"])
    c, h, w = manifest.embedding
    for key, (b, n) in (("minShapes", (1, 1)), ("optShapes", (4, 4)), ("maxShapes", (8, 8))):
        shapes = _shapes(dec[key])
        assert shapes["point_coords"] == (b, n, 2) and shapes["point_labels"] == (b, n)
        assert shapes["mask_input"] == (b, 1, 4 * h, 4 * w) and shapes["has_mask_input"] == (b,)
        assert set(shapes) == {i.name for i in sess.get_inputs()} - {"image_embeddings"}
        feed = {i.name: np.zeros(shapes.get(i.name, (1, c, h, w)), np.float32) for i in sess.get_inputs()}
        feed["point_labels"][:] = 1
        low, iou = sess.run(["low_res_masks", "iou_predictions"], feed)
        assert low.shape == (b, 4, 4 * h, 4 * w) and iou.shape == (b, 4)
    # --json gives the same profile as the command lines
    code, out, err = run_cli("build-engine", str(real_export), "--print-trtexec", "--json", "--max-points", "8",
                             "--opt-batch", "4", "--max-batch", "8")
    assert code == 0, err
    prof = json.loads(out)["profiles"]["decoder"]
    assert {k: tuple(v["max"]) for k, v in prof.items()} == _shapes(dec["maxShapes"])
    assert {k: tuple(v["min"]) for k, v in prof.items()} == _shapes(dec["minShapes"])
    # fp16 from this fp32 export: the TensorRT 10 route (--fp16), with the TensorRT 11 note
    code, out, _ = run_cli("build-engine", str(real_export), "--print-trtexec", "--precision", "fp16")
    assert code == 0 and "TensorRT 11 has no --fp16" in out
    assert all("--fp16" in ln and "--stronglyTyped" not in ln for ln in out.splitlines() if ln.startswith("trtexec"))


# ---- engine.json: compatibility and integrity ---------------------------------------------------------------

def _fake_engines(out: Path, manifest: Manifest, **over) -> dict:
    engines = {}
    for role, (fname, onnx_role) in rt.ENGINES.items():
        (out / fname).write_bytes(f"not a real {role} plan".encode())
        engines[role] = {"path": fname, "sha256": file_entry(out / fname)["sha256"], "bytes": 1,
                         "onnx_sha256": manifest.files[onnx_role]["sha256"]}
    meta = {"format": rt.ENGINE_FORMAT, "format_version": 1, "tensorrt_version": "10.7.0", "precision": "fp16",
            "gpu": {"name": "NVIDIA GeForce RTX 3090", "compute_capability": "8.6"}, "engines": engines, **over}
    (out / rt.ENGINE_META).write_text(json.dumps(meta))
    return meta


def test_engine_metadata_mismatch_refused(synthetic):
    manifest = read_manifest(synthetic)
    meta = _fake_engines(synthetic, manifest)
    assert rt.read_engine_meta(synthetic, manifest) == meta
    here = {"name": "NVIDIA GeForce RTX 3090", "compute_capability": "8.6"}
    rt.check_engine_compatible(meta, "10.7.0", here, synthetic)  # same GPU model and TensorRT: fine
    with pytest.raises(UsageError) as exc:
        rt.check_engine_compatible(meta, "10.7.0", {"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"},
                                   synthetic)
    msg = str(exc.value)
    assert "encoder.engine and decoder.engine" in msg and "NVIDIA GeForce RTX 3090" in msg and "A100" in msg
    assert f"peft-export build-engine {synthetic} --force" in msg
    with pytest.raises(UsageError, match=r"TensorRT 10\.7\.0 \(this machine has TensorRT 10\.8\.0\)"):
        rt.check_engine_compatible(meta, "10.8.0", here, synthetic)
    with pytest.raises(UsageError, match=r"compute capability 8.6"):  # same name, other chip revision
        rt.check_engine_compatible(meta, "10.7.0", {**here, "compute_capability": "8.9"}, synthetic)
    # integrity: a modified engine, an engine built from another export, a missing file
    (synthetic / "decoder.engine").write_bytes(b"tampered")
    with pytest.raises(VerificationError, match=r"decoder.engine does not match its sha256"):
        rt.read_engine_meta(synthetic, manifest)
    other = Manifest(**{**manifest.to_dict(), "files": {**manifest.files, "encoder": {
        **manifest.files["encoder"], "sha256": "0" * 64}}})
    _fake_engines(synthetic, manifest)
    with pytest.raises(DataError, match=r"built from a different encoder.onnx"):
        rt.read_engine_meta(synthetic, other)
    (synthetic / "encoder.engine").unlink()
    with pytest.raises(DataError, match=r"encoder.engine .* is missing"):
        rt.read_engine_meta(synthetic, manifest)
    (synthetic / rt.ENGINE_META).unlink()
    with pytest.raises(DataError, match="no TensorRT engines"):
        rt.read_engine_meta(synthetic, manifest)


def test_backend_refuses_foreign_engines(synthetic, sim):
    _fake_engines(synthetic, read_manifest(synthetic))
    sim.cuda = SimCuda(name="NVIDIA H100 80GB HBM3", cc=(9, 0))
    sim.trt = SimTRT(version="10.7.0")
    with pytest.raises(UsageError, match=r"built for NVIDIA GeForce RTX 3090 .* rebuild both here"):
        rt.TensorRTBackend(synthetic)
    from peft_export.runtime.backends import RuntimeOptions, open_model

    with pytest.raises(UsageError, match="rebuild both here"):
        open_model(synthetic, RuntimeOptions(backend="tensorrt"))
