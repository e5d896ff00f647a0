"""`peft-export build-engine` and the TensorRT runtime backend.

TensorRT cannot be installed on our development/CI machines and they have no GPU, so this file checks what can
be checked without them, and nothing here shows that TensorRT itself builds or runs our engines:

- the refusal paths (no TensorRT / no cuda-python / no CUDA GPU -> one line, exit 2, nothing written);
- the trtexec command lines generated from a REAL vit_tiny export (the profile shapes are fed to the ONNX graph
  with ONNX Runtime, an independent check that the graph accepts them);
- the optimisation-profile shapes derived from --min/opt/max-points and --min/opt/max-batch, and option errors;
- precision selection for TensorRT 10 vs 11 (feature detection) and the engine.json compatibility/integrity
  check (another GPU model or TensorRT version refused with what to rebuild) on synthetic metadata;
- the argument types our code passes to the real cuda-python (installed here; every call fails without a GPU).

ORCHESTRATION ONLY: ``SimTRT``/``SimCuda`` (section "simulation") stand in for the parts of the TensorRT Python
API and cuda-python that our code calls, as we read NVIDIA's documentation; they execute the ONNX graph with ONNX
Runtime and keep "device" memory in host buffers. The ``test_orchestration_*`` tests use them to check our build
flow (flags, profiles, timing cache, atomic publishing, parity gate, engine.json, batch splitting). They cannot
catch a misreading of TensorRT's API or any TensorRT behaviour. The ``tensorrt``/``gpu``-marked tests at the end
build and run real engines; they skip here with the reason.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from peft_export.errors import DataError, MissingDependencyError, UsageError, VerificationError
from peft_export.export import tensorrt as te
from peft_export.manifest import Manifest, file_entry, read_manifest, write_manifest
from peft_export.runtime import tensorrt_backend as rt

S, C, H = 32, 8, 8  # synthetic export: input size, embedding channels, embedding side (masks 4H)
INSTALL = "pip install 'peft-export[tensorrt]'"


# ---- a synthetic export folder (exact I/O signature of the real one; a simple, nontrivial graph) -----------

def _synthetic_graphs(out: Path, *, fp16: bool = False) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    f = TensorProto.FLOAT
    enc = helper.make_graph(
        [helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]),
         helper.make_node("Conv", ["pooled", "w"], ["image_embeddings"])],
        "encoder", [helper.make_tensor_value_info("image", f, [1, 3, S, S])],
        [helper.make_tensor_value_info("image_embeddings", f, [1, C, H, H])],
        [numpy_helper.from_array(rng.normal(0, 0.05, (C, 3, 1, 1)).astype(np.float32), "w")])
    g = np.arange(4 * H, dtype=np.float32) * (S / (4 * H))
    init = {
        "gx": np.broadcast_to(g[None, :], (4 * H, 4 * H)).reshape(1, 1, 4 * H, 4 * H).copy(),
        "gy": np.broadcast_to(g[:, None], (4 * H, 4 * H)).reshape(1, 1, 4 * H, 4 * H).copy(),
        "shape4": np.array([-1, 1, 1, 1], np.int64), "scales": np.array([1, 1, 4, 4], np.float32),
        "axis1": np.array([1], np.int64), "radius": np.array(40.0, np.float32), "three": np.array(3.0, np.float32),
        "variants": np.array([1.0, 0.9, 1.1, 1.2], np.float32).reshape(1, 4, 1, 1),
        "iou_scale": np.array([[1.0, 0.9, 0.8, 0.7]], np.float32),
    }
    nodes = [
        helper.make_node("ReduceMean", ["point_coords", "axis1"], ["pc"], keepdims=0),  # (B, 2)
        helper.make_node("Split", ["pc"], ["cx", "cy"], axis=1, num_outputs=2),
        helper.make_node("Reshape", ["cx", "shape4"], ["cx4"]),
        helper.make_node("Reshape", ["cy", "shape4"], ["cy4"]),
        helper.make_node("Sub", ["gx", "cx4"], ["dx"]), helper.make_node("Sub", ["gy", "cy4"], ["dy"]),
        helper.make_node("Mul", ["dx", "dx"], ["dx2"]), helper.make_node("Mul", ["dy", "dy"], ["dy2"]),
        helper.make_node("Add", ["dx2", "dy2"], ["d2"]), helper.make_node("Div", ["d2", "radius"], ["d2s"]),
        helper.make_node("Sub", ["three", "d2s"], ["blob"]),  # (B, 1, 4H, 4H): positive near the prompt
        helper.make_node("ReduceMean", ["image_embeddings", "axis1"], ["feat"], keepdims=1),
        helper.make_node("Resize", ["feat", "", "scales"], ["feat_up"], mode="nearest"),
        helper.make_node("Reshape", ["has_mask_input", "shape4"], ["has4"]),
        helper.make_node("Mul", ["mask_input", "has4"], ["prev"]),
        helper.make_node("Add", ["blob", "feat_up"], ["m1"]), helper.make_node("Add", ["m1", "prev"], ["m2"]),
        helper.make_node("Mul", ["m2", "variants"], ["low_res_masks"]),
        helper.make_node("ReduceMean", ["point_labels", "axis1"], ["lab"], keepdims=1),
        helper.make_node("Sigmoid", ["lab"], ["labs"]),
        helper.make_node("Mul", ["labs", "iou_scale"], ["iou_predictions"]),
    ]
    dec = helper.make_graph(
        nodes, "decoder_lowres",
        [helper.make_tensor_value_info("image_embeddings", f, [1, C, H, H]),
         helper.make_tensor_value_info("point_coords", f, ["B", "N", 2]),
         helper.make_tensor_value_info("point_labels", f, ["B", "N"]),
         helper.make_tensor_value_info("mask_input", f, ["B", 1, 4 * H, 4 * H]),
         helper.make_tensor_value_info("has_mask_input", f, ["B"])],
        [helper.make_tensor_value_info("low_res_masks", f, ["B", 4, 4 * H, 4 * H]),
         helper.make_tensor_value_info("iou_predictions", f, ["B", 4])],
        [numpy_helper.from_array(v, k) for k, v in init.items()])
    for graph, name in ((enc, "encoder.onnx"), (dec, "decoder_lowres.onnx")):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
        onnx.checker.check_model(model)
        onnx.save(model, str(out / name))


def make_synthetic_export(out: Path, precision: str = "fp32") -> Path:
    from peft_export.models.registry import get_spec

    out.mkdir(parents=True, exist_ok=True)
    _synthetic_graphs(out)
    pre = get_spec("vit_tiny").preprocess.to_dict()
    pre["img_size"] = S
    files = {"encoder": file_entry(out / "encoder.onnx"), "decoder_lowres": file_entry(out / "decoder_lowres.onnx")}
    write_manifest(out, Manifest(model="synthetic", preprocess=pre, embedding=[C, H, H], mask_input_size=[4 * H, 4 * H],
                                 multimask=True, precision=precision, opset=18, files=files, verified=False))
    return out


@pytest.fixture
def synthetic(tmp_path) -> Path:
    return make_synthetic_export(tmp_path / "export")


def listing(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_size for p in sorted(d.rglob("*"))}


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
    from peft_export.models.loading import load_model

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("real_export") / "export"
    export_model(prepare_for_export(load_model("vit_tiny", require_weights=False)), out, ExportOptions(verify=False))
    return out


# ---- refusal paths (exit 2, one line, nothing written) ---------------------------------------------------------

def _one_line(err: str) -> bool:
    return len([ln for ln in err.splitlines() if ln.strip()]) == 1


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

    monkeypatch.setattr(rt, "import_cudart", missing)
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
        rt.cuda_device(cudart)
    a = np.zeros(4, np.float32)
    h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
    stream = cudart.cudaStream_t()
    assert isinstance(int(stream), int)  # what EngineRunner passes to execute_async_v3
    for result in (cudart.cudaMalloc(16), cudart.cudaStreamCreate(),
                   cudart.cudaMemcpyAsync(0, a.ctypes.data, 16, h2d, stream), cudart.cudaStreamSynchronize(stream),
                   cudart.cudaFree(0)):
        assert int(result[0]) != 0  # an error code, not a TypeError: the signatures fit
    with pytest.raises(Exception, match=r"CUDA call cudaMalloc failed: cuda"):
        rt.cuda_call(cudart, cudart.cudaMalloc(16), "cudaMalloc")


def test_tensorrt_modules_do_not_import_torch():
    code = ("import sys, peft_export.runtime.tensorrt_backend, peft_export.export.tensorrt; "
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
                      (("--precision", "fp8"), "unknown precision 'fp8'")]:
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


TRT10 = {"version": "10.7.0", "weak_typing": True, "strongly_typed_flag": True, "tf32_flag": True}
TRT11 = {"version": "11.0.0", "weak_typing": False, "strongly_typed_flag": True, "tf32_flag": True}


def test_precision_resolution():
    ops = {"MatMul", "Softmax"}
    assert te.resolve_precision(_manifest("fp32"), None, ops, TRT10)[:2] == ("fp32", "strong")
    assert te.resolve_precision(_manifest("fp32"), "fp16", ops, TRT10)[:2] == ("fp16", "weak-fp16")
    assert te.resolve_precision(_manifest("fp16"), None, ops, TRT11)[:2] == ("fp16", "strong")
    assert te.resolve_precision(_manifest("fp16"), "fp16", ops, TRT10)[:2] == ("fp16", "strong")
    with pytest.raises(UsageError, match=r"strongly typed .*--precision fp16"):
        te.resolve_precision(_manifest("fp32"), "fp16", ops, TRT11)
    with pytest.raises(UsageError, match="needs an fp32 export"):
        te.resolve_precision(_manifest("fp16"), "fp32", ops, TRT10)
    with pytest.raises(UsageError, match="QuantizeLinear/DequantizeLinear"):
        te.resolve_precision(_manifest("fp32"), "int8", ops, TRT10)
    with pytest.raises(UsageError, match="dynamic int8"):
        te.resolve_precision(_manifest("int8"), None, ops | {"MatMulInteger", "DynamicQuantizeLinear"}, TRT10)
    assert te.resolve_precision(_manifest("int8"), None, ops | {"QuantizeLinear", "DequantizeLinear"},
                                TRT11)[:2] == ("int8", "strong")
    # unknown TensorRT (--print-trtexec without TensorRT): the TensorRT 10 route, with a note about 11
    prec, mode, notes = te.resolve_precision(_manifest("fp32"), "fp16", ops, None)
    assert (prec, mode) == ("fp16", "weak-fp16") and "TensorRT 11" in notes[0]


def test_capabilities_by_feature_detection():
    assert rt.tensorrt_capabilities(SimTRT(weak=True))["weak_typing"] is True
    caps = rt.tensorrt_capabilities(SimTRT(version="11.0.0", weak=False))
    assert caps["weak_typing"] is False and caps["strongly_typed_flag"] is True and caps["tf32_flag"] is True
    # a version string alone decides nothing
    assert rt.tensorrt_capabilities(SimTRT(version="11.0.0", weak=True))["weak_typing"] is True
    assert rt.tensorrt_capabilities(SimTRT(version="8.6.1", strongly_typed=False))["strongly_typed_flag"] is False


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
    if not manifest.baked_preprocessing:
        assert not any(k.endswith("Shapes") for k in enc)  # a static encoder needs no profile
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
    from peft_export.runtime.segmenter import open_backend

    with pytest.raises(UsageError, match="rebuild both here"):
        open_backend(synthetic, "tensorrt")


# ---- simulation: ORCHESTRATION ONLY (see the module docstring) -------------------------------------------------
# A stand-in for the TensorRT 10/11 Python API and cuda-python as our code uses them. It enforces what the
# documentation says our calls must respect (names, return conventions, no precision builder flags on strongly
# typed networks, input shapes inside the profile) but it is not TensorRT.

class _Enum:
    def __init__(self, **members):
        self.__dict__.update(members)


class SimDims(tuple):
    pass


class SimLogger:
    class Severity:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, *args):
        pass


class SimTRT:
    """``import tensorrt as trt`` stand-in. ``weak=False`` mimics TensorRT 11 (no BuilderFlag.FP16)."""

    def __init__(self, version="10.99.0-sim", weak=True, noise=0.0, noisy=("image_embeddings", "low_res_masks"),
                 strongly_typed=True):
        self.__version__ = version
        self.noise, self.noisy = noise, noisy  # an offset added to the outputs named in noisy
        flags = {"TF32": 1}
        if weak:
            flags.update(FP16=2, INT8=3)
        self.BuilderFlag = _Enum(**flags)
        # TensorRT 10: opt-in; TensorRT 11: deprecated and ignored; TensorRT 8: absent (EXPLICIT_BATCH instead)
        self.NetworkDefinitionCreationFlag = _Enum(STRONGLY_TYPED=5) if strongly_typed else _Enum(EXPLICIT_BATCH=0)
        self.MemoryPoolType = _Enum(WORKSPACE="workspace")
        self.TensorIOMode = _Enum(INPUT="in", OUTPUT="out")
        self.ILogger = SimLogger
        self.builds: list[dict] = []
        sim = self

        class Builder:
            def __init__(self, logger):
                self.logger = logger

            def create_network(self, flags):
                return SimpleNamespace(flags=flags, onnx=None)

            def create_builder_config(self):
                return SimConfig(default_flags={1})  # TensorRT enables TF32 by default

            def create_optimization_profile(self):
                return SimProfile()

            def build_serialized_network(self, network, config):
                strong = network.flags & (1 << 5) or not hasattr(sim.BuilderFlag, "FP16")
                if strong and config.flags & {2, 3}:  # precision builder flags on a strongly typed network
                    self.logger.log(SimLogger.Severity.ERROR, "precision flags not allowed in strongly typed mode")
                    return None
                desc = {"onnx": network.onnx, "flags": network.flags, "config_flags": sorted(config.flags),
                        "workspace": config.workspace, "profile": config.profiles[0].shapes if config.profiles else {}}
                sim.builds.append(desc)
                if config.cache is not None:
                    config.cache.data += b"+" + Path(network.onnx).name.encode()
                return json.dumps(desc).encode()

        class OnnxParser:
            def __init__(self, network, logger):
                self.network = network
                self.num_errors = 0

            def parse_from_file(self, path):
                import onnx

                onnx.checker.check_model(onnx.load(path))
                self.network.onnx = path
                return True

            def get_error(self, i):
                return "no error"

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, plan):
                try:
                    return SimEngine(json.loads(bytes(plan)), sim)
                except ValueError:
                    return None

        self.Builder, self.OnnxParser, self.Runtime = Builder, OnnxParser, Runtime

    @staticmethod
    def nptype(dtype):
        return dtype


class SimConfig:
    def __init__(self, default_flags=()):
        self.flags, self.profiles, self.cache, self.workspace = set(default_flags), [], None, None

    def set_memory_pool_limit(self, pool, size):
        self.workspace = size

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.flags.discard(flag)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data):
        return SimpleNamespace(data=bytes(data), serialize=None)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache = cache
        return True

    def get_timing_cache(self):
        cache = self.cache
        return SimpleNamespace(serialize=lambda: cache.data)


class SimProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, mn, opt, mx):
        self.shapes[name] = [list(mn), list(opt), list(mx)]


_ORT_NP = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16),
           "tensor(uint8)": np.dtype(np.uint8)}


class SimEngine:
    def __init__(self, desc, sim):
        import onnxruntime as ort

        self.desc, self.sim = desc, sim
        self.session = ort.InferenceSession(desc["onnx"], providers=["CPUExecutionProvider"])
        self.io = {i.name: ("in", i) for i in self.session.get_inputs()}
        self.io.update({o.name: ("out", o) for o in self.session.get_outputs()})
        self.names = list(self.io)
        self.num_io_tensors = len(self.names)

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return self.io[name][0]

    def get_tensor_dtype(self, name):
        return _ORT_NP[self.io[name][1].type]

    def get_tensor_shape(self, name):
        return SimDims(d if isinstance(d, int) else -1 for d in self.io[name][1].shape)

    def get_tensor_profile_shape(self, name, index):
        assert index == 0
        return [SimDims(s) for s in self.desc["profile"][name]]

    def create_execution_context(self):
        return SimContext(self)


class SimContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses = engine, {}, {}

    def set_input_shape(self, name, shape):
        static = self.engine.get_tensor_shape(name)
        if len(shape) != len(static):
            return False
        if name in self.engine.desc["profile"]:
            mn, _, mx = self.engine.desc["profile"][name]
            if not all(a <= s <= b for a, s, b in zip(mn, shape, mx)):
                return False
        elif tuple(shape) != tuple(static):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        if self.engine.io[name][0] == "in":
            return SimDims(self.shapes.get(name, self.engine.get_tensor_shape(name)))
        symbols = {}
        for n, shape in self.shapes.items():
            for sym, v in zip(self.engine.io[n][1].shape, shape):
                if isinstance(sym, str):
                    symbols[sym] = v
        return SimDims(d if isinstance(d, int) else symbols.get(d, -1) for d in self.engine.io[name][1].shape)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_handle):
        assert isinstance(stream_handle, int)
        feed = {}
        for name, (mode, info) in self.engine.io.items():
            assert name in self.addresses, f"no address for {name}"
            if mode == "in":
                dtype = _ORT_NP[info.type]
                n = int(np.prod(self.shapes[name])) * dtype.itemsize
                buf = (ctypes.c_char * max(n, 1)).from_address(self.addresses[name])
                feed[name] = np.frombuffer(buf, dtype, count=n // dtype.itemsize).reshape(self.shapes[name]).copy()
        outs = self.engine.session.run(None, feed)
        for o, arr in zip(self.engine.session.get_outputs(), outs):
            if o.name in self.engine.sim.noisy:
                arr = np.ascontiguousarray(arr + self.engine.sim.noise, arr.dtype)
            assert tuple(arr.shape) == tuple(self.get_tensor_shape(o.name))
            ctypes.memmove(self.addresses[o.name], arr.ctypes.data, arr.nbytes)
        return True


class SimCuda:
    """``cuda.bindings.runtime`` stand-in: (error, value) tuples; "device" memory is host memory."""

    class cudaMemcpyKind:  # mirrors the real name
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    def __init__(self, name="NVIDIA SimGPU", cc=(8, 6), devices=1):
        self.name, self.cc, self.devices = name, cc, devices
        self.allocations: dict[int, ctypes.Array] = {}

    def cudaGetDeviceCount(self):
        return (0, self.devices) if self.devices else (100, 0)

    def cudaGetErrorName(self, err):
        return 0, {100: b"cudaErrorNoDevice", 35: b"cudaErrorInsufficientDriver"}.get(int(err), b"cudaErrorUnknown")

    def cudaDriverGetVersion(self):
        return 0, 12040 if self.devices else 0

    def cudaRuntimeGetVersion(self):
        return 0, 12040

    def cudaSetDevice(self, device):
        return (0,)

    def cudaGetDeviceProperties(self, device):
        return 0, SimpleNamespace(name=self.name.encode() + b"\x00\x00", major=self.cc[0], minor=self.cc[1],
                                  totalGlobalMem=8 << 30)

    def cudaMalloc(self, n):
        buf = (ctypes.c_char * n)()
        self.allocations[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def cudaFree(self, ptr):
        self.allocations.pop(int(ptr), None)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        device = dst if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice else src
        base = max((a for a in self.allocations if a <= device), default=None)
        assert base is not None and device + n <= base + len(self.allocations[base]), "copy outside an allocation"
        ctypes.memmove(dst, src, n)
        return (0,)

    def cudaStreamCreate(self):
        return 0, 7

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaStreamDestroy(self, stream):
        return (0,)


@pytest.fixture
def sim(monkeypatch):
    """Install the simulation; returns a namespace whose .trt/.cuda can be replaced per test."""
    ns = SimpleNamespace(trt=SimTRT(), cuda=SimCuda())
    monkeypatch.setattr(rt, "import_tensorrt", lambda: ns.trt)
    monkeypatch.setattr(rt, "import_cudart", lambda: ns.cuda)
    return ns


# ---- the whole flow on the simulation ------------------------------------------------------------------------

def test_orchestration_build_publish_and_run(synthetic, sim, run_cli, tmp_path):
    from peft_export.runtime.onnx_backend import OnnxBackend

    cache = tmp_path / "cache.bin"
    code, out, err = run_cli("build-engine", str(synthetic), "--json", "--max-points", "6", "--opt-batch", "2",
                             "--max-batch", "4", "--min-batch", "2", "--timing-cache", str(cache))
    assert code == 0, err
    meta = json.loads(out)
    assert json.loads((synthetic / "engine.json").read_text()) == meta
    assert meta["tensorrt_version"] == "10.99.0-sim" and meta["gpu"]["name"] == "NVIDIA SimGPU"
    assert meta["gpu"]["compute_capability"] == "8.6" and meta["precision"] == "fp32" and meta["verified"]
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
    assert not list(synthetic.glob(".build-engine-*"))

    # the backend: same numbers as ONNX Runtime, batches split (B > 4) and padded (B < 2), mask_input used
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
    # through the Segmenter, as predict/evaluate use it
    from peft_export.runtime.segmenter import Segmenter

    image = (np.random.default_rng(3).random((40, 30)) * 255).astype(np.uint8)
    seg_t, seg_o = Segmenter(backend=trt_b), Segmenter(backend=ort_b)
    for seg in (seg_t, seg_o):
        seg.set_image(image)
    a, b_ = seg_t.predict(boxes=[[2, 3, 20, 30], [5, 5, 25, 35]]), seg_o.predict(boxes=[[2, 3, 20, 30], [5, 5, 25, 35]])
    np.testing.assert_array_equal(a.masks, b_.masks)
    trt_b.close()

    # existing engines: refused without --force; a failing gate with --force keeps the old engines intact
    before = listing(synthetic)
    code, _, err = run_cli("build-engine", str(synthetic))
    assert code == 2 and "already exists; pass --force" in err
    sim.trt = SimTRT(noise=0.5)
    code, _, err = run_cli("build-engine", str(synthetic), "--force")
    assert code == 1 and "do not match ONNX Runtime" in err and "nothing was written" in err
    assert listing(synthetic) == before
    # --force with a passing build replaces them
    sim.trt = SimTRT(version="10.99.1-sim")
    code, _, err = run_cli("build-engine", str(synthetic), "--force", "-q")
    assert code == 0, err
    assert json.loads((synthetic / "engine.json").read_text())["tensorrt_version"] == "10.99.1-sim"


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
        rt.environment()
    except MissingDependencyError as exc:
        return str(exc)
    return None


_GPU_SKIP = _gpu_skip_reason()
needs_gpu = pytest.mark.skipif(_GPU_SKIP is not None, reason=str(_GPU_SKIP))


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", ["fp32", "fp16-flag", "fp16-export"])
def test_real_tensorrt_build_run_and_refuse(real_export, tmp_path, run_cli, case):
    """Real engines: fp32; fp16 through BuilderFlag.FP16 (TensorRT 10 only); fp16 from an fp16 export (strongly
    typed, TensorRT 10 and 11). Compared with ONNX Runtime on the same graphs; then a foreign engine.json is
    refused."""
    from peft_export.runtime.onnx_backend import OnnxBackend

    out = tmp_path / "export"
    if case == "fp16-export":
        import torch

        from peft_export.export import ExportOptions, export_model, prepare_for_export
        from peft_export.models.loading import load_model

        torch.manual_seed(0)
        export_model(prepare_for_export(load_model("vit_tiny", require_weights=False)), out,
                     ExportOptions(precision="fp16"))
    else:
        shutil.copytree(real_export, out)
    args = ["--precision", "fp16"] if case == "fp16-flag" else []
    code, stdout, err = run_cli("build-engine", str(out), *args, "--max-points", "8", "--json")
    if case == "fp16-flag" and not rt.tensorrt_capabilities(rt.import_tensorrt())["weak_typing"]:
        assert code == 2 and "strongly typed" in err, err  # TensorRT 11: refused, with what to do instead
        return
    assert code == 0, err
    meta = json.loads(stdout)
    assert meta["parity"]["passed"] and meta["verified"]
    assert meta["tensorrt_version"] == rt.import_tensorrt().__version__

    trt_b, ort_b = rt.TensorRTBackend(out), OnnxBackend(out)
    x = np.random.default_rng(0).normal(size=(1, 3, *(2 * [ort_b.preprocess.img_size]))).astype(np.float32)
    emb_t, emb_o = trt_b.embed(x), ort_b.embed(x)
    rng = np.random.default_rng(1)
    coords = rng.uniform(0, ort_b.preprocess.img_size, (5, 3, 2)).astype(np.float32)
    labels = np.ones((5, 3), np.float32)
    low_t, _ = trt_b.decode(emb_o, coords, labels)
    low_o, _ = ort_b.decode(emb_o, coords, labels)
    if case == "fp32":  # TF32 off: fp32-exact up to summation order
        np.testing.assert_allclose(emb_t, emb_o, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(low_t, low_o, rtol=1e-3, atol=1e-3)
    else:  # masks thresholded at the reference's median: never empty, so the IoU can fail
        t = float(np.median(low_o))
        a, b = low_t > t, low_o > t
        assert np.logical_and(a, b).sum() / np.logical_or(a, b).sum() >= 0.98
    trt_b.close()

    meta["gpu"] = {**meta["gpu"], "name": "NVIDIA Some Other GPU"}
    (out / "engine.json").write_text(json.dumps(meta))
    with pytest.raises(UsageError, match="rebuild both here"):
        rt.TensorRTBackend(out)
