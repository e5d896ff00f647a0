"""int8 engines from an explicitly quantized (Q/DQ) encoder: what is decidable without TensorRT.

- the compatibility check read from the graph itself (TensorRT only builds symmetric int8 Q/DQ: signed int8, zero
  point 0) on small hand-made graphs and on graphs made by ONNX Runtime's own ``quantize_static``;
- the precision decision, builder flags and trtexec lines for TensorRT 10 and 11 (feature detection);
- the build flow against the SIMULATED TensorRT of ``trt_sim.py`` (``test_orchestration_*``: our logic only —
  which flags reach the builder, the gate, engine.json; never TensorRT's int8 behaviour, which is unverified).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from trt_sim import S, SimTRT, encoder_graph, install_sim, listing, make_synthetic_export, one_line, save_graph

from peft_export.errors import UsageError
from peft_export.export import tensorrt as te

TRT10 = {"version": "10.7.0", "weak_typing": True, "strongly_typed_flag": True, "tf32_flag": True}
TRT11 = {"version": "11.0.0", "weak_typing": False, "strongly_typed_flag": True, "tf32_flag": True}


@pytest.fixture
def sim(monkeypatch):
    return install_sim(monkeypatch)


def _qdq_pair(path: Path, *, zp=None, output_dtype=None, runtime_zp=False, external=False) -> te.GraphFacts:
    """x -> QuantizeLinear -> DequantizeLinear -> y with the given zero point (None: no zero point input)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s")]
    zp_name = ""
    nodes = []
    if zp is not None:
        inits.append(numpy_helper.from_array(np.asarray(zp), "zp"))
        zp_name = "zp"
        if runtime_zp:  # the zero point comes out of a node, not a constant
            nodes.append(helper.make_node("Identity", ["zp"], ["zp_rt"]))
            zp_name = "zp_rt"
    attrs = {"output_dtype": output_dtype} if output_dtype is not None else {}
    nodes += [helper.make_node("QuantizeLinear", ["x", "s", zp_name] if zp_name else ["x", "s"], ["q"], **attrs),
              helper.make_node("DequantizeLinear", ["q", "s", zp_name] if zp_name else ["q", "s"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    if external:  # every initializer in a side file: the check must read the zero point from there
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, str(path))
    return te.read_onnx(path)


# ---- the compatibility check, from the graph ------------------------------------------------------------------

def test_symmetric_int8_qdq_is_accepted(tmp_path):
    facts = te.read_onnx(save_graph(encoder_graph("symmetric"), tmp_path / "encoder.onnx"))
    assert facts.qdq_nodes == 3 and facts.qdq_issues == set() and te.qdq_refusal(facts) is None
    assert te.qdq_refusal(_qdq_pair(tmp_path / "a.onnx", zp=np.int8(0))) is None
    assert te.qdq_refusal(_qdq_pair(tmp_path / "b.onnx", zp=np.zeros(1, np.int8), external=True)) is None
    # opset 21: no zero point, output type int8 by attribute
    assert te.qdq_refusal(_qdq_pair(tmp_path / "c.onnx", output_dtype=3)) is None
    float_facts = te.read_onnx(save_graph(encoder_graph(None), tmp_path / "float.onnx"))
    assert float_facts.qdq_nodes == 0 and te.qdq_refusal(float_facts) is None


def test_uint8_or_nonzero_zero_points_are_refused(tmp_path):
    why = te.qdq_refusal(te.read_onnx(save_graph(encoder_graph("uint8"), tmp_path / "encoder.onnx")))
    assert why.startswith("encoder.onnx quantizes activations as uint8 with non-zero zero points (ONNX Runtime's "
                          "uint8 CPU layout); TensorRT needs symmetric int8 Q/DQ (signed int8, zero point 0): "
                          "re-export with --precision int8 --int8-target tensorrt"), why
    assert "weights" not in why.split(";")[0] and one_line(why)  # the weights are symmetric int8
    why = te.qdq_refusal(te.read_onnx(save_graph(encoder_graph("int8-nonzero"), tmp_path / "encoder.onnx")))
    assert why.startswith("encoder.onnx quantizes activations as int8 with non-zero zero points (ONNX Runtime "
                          "quantize_static's default: asymmetric activations);"), why
    # uint8 with zero point 0 is still unsigned; read from external data too
    why = te.qdq_refusal(_qdq_pair(tmp_path / "u.onnx", zp=np.zeros(1, np.uint8), external=True))
    assert why.startswith("u.onnx quantizes activations as uint8;"), why
    # no zero point and no output_dtype: ONNX's default output type, uint8
    assert "activations as uint8;" in te.qdq_refusal(_qdq_pair(tmp_path / "d.onnx"))
    why = te.qdq_refusal(_qdq_pair(tmp_path / "r.onnx", zp=np.int8(0), runtime_zp=True))
    assert "activations with zero points computed at run time" in why, why


def _calibration(n: int = 4):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.items = iter([{"image": rng.normal(size=(1, 3, S, S)).astype(np.float32)} for _ in range(n)])

        def get_next(self):
            return next(self.items, None)

    return Reader()


def _ort_quantized(tmp_path: Path, name: str, **kwargs) -> te.GraphFacts:
    from onnxruntime.quantization import QuantFormat, quantize_static

    src = tmp_path / "float.onnx"
    if not src.exists():
        save_graph(encoder_graph(None), src)
    dest = tmp_path / name / "encoder.onnx"
    dest.parent.mkdir()
    quantize_static(str(src), str(dest), _calibration(), quant_format=QuantFormat.QDQ, per_channel=True, **kwargs)
    return te.read_onnx(dest)


def test_onnx_runtime_static_quantization_layouts(tmp_path):
    """Graphs made by ONNX Runtime's quantize_static: its default (asymmetric int8 activations) and its uint8
    layout are refused; the settings our refusal message names give what TensorRT builds."""
    from onnxruntime.quantization import QuantType

    why = te.qdq_refusal(_ort_quantized(tmp_path, "default"))
    assert why is not None and "activations as int8 with non-zero zero points" in why, why
    assert "--int8-target tensorrt" in why  # the remedy: our export's TensorRT layout
    why = te.qdq_refusal(_ort_quantized(tmp_path, "uint8", activation_type=QuantType.QUInt8))
    assert why is not None and "activations as uint8 with non-zero zero points" in why, why
    facts = _ort_quantized(tmp_path, "symmetric", activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                           extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    assert facts.qdq_nodes > 0 and te.qdq_refusal(facts) is None


# ---- precision, flags and trtexec lines (no TensorRT) -------------------------------------------------------

def _graphs(tmp_path: Path, qdq: str | None) -> dict[str, te.GraphFacts]:
    out = make_synthetic_export(tmp_path / f"export-{qdq}", "int8", qdq=qdq)
    return {"encoder": te.read_onnx(out / "encoder.onnx"), "decoder": te.read_onnx(out / "decoder_lowres.onnx")}


def test_int8_precision_resolution(tmp_path):
    manifest = type("M", (), {"precision": "int8"})()
    symmetric = _graphs(tmp_path, "symmetric")
    for caps in (TRT10, TRT11, None):
        got = te.resolve_precision(manifest, None, symmetric, caps)
        assert got[:2] == ("int8", "strong") and got.engines == {"encoder": "int8", "decoder": "fp32"}
        assert "without --int8" in got.notes[0] and "decoder_lowres.onnx: float32, built in fp32" in got.notes[0]
    assert te.resolve_precision(manifest, "int8", symmetric, TRT10).engines["encoder"] == "int8"
    with pytest.raises(UsageError, match=r"quantizes activations as uint8 with non-zero zero points"):
        te.resolve_precision(manifest, None, _graphs(tmp_path, "uint8"), TRT10)
    with pytest.raises(UsageError, match=r"dynamic int8 quantization \(ConvInteger, DynamicQuantizeLinear\)"):
        te.resolve_precision(manifest, None, _graphs(tmp_path, "dynamic"), TRT10)
    with pytest.raises(UsageError, match="this export is quantized"):
        te.resolve_precision(manifest, "fp16", symmetric, TRT10)
    fp32 = type("M", (), {"precision": "fp32"})()
    with pytest.raises(UsageError, match=r"explicitly quantized encoder.onnx \(QuantizeLinear/DequantizeLinear"):
        te.resolve_precision(fp32, "int8", _graphs(tmp_path, None), TRT10)


def test_int8_builder_flags_and_trtexec_lines(tmp_path):
    """Strongly typed on both TensorRT versions, no precision flag: TensorRT 10 by the creation flag
    (--stronglyTyped; --int8 with it is refused), TensorRT 11 by default (neither flag)."""
    out = make_synthetic_export(tmp_path / "export", "int8", qdq="symmetric")
    for caps, strong_flag in ((None, True), (TRT10, True), (TRT11, False)):
        plan = te.plan_engines(out, capabilities=caps)
        assert plan.mode == "strong" and plan.strongly_typed_flag is strong_flag and plan.no_tf32
        assert {r: e.precision for r, e in plan.engines.items()} == {"encoder": "int8", "decoder": "fp32"}
        assert plan.build_mode == ("strongly typed, explicit int8 quantization (symmetric Q/DQ in encoder.onnx; "
                                   "decoder_lowres.onnx fp32)")
        for argv in plan.trtexec().values():
            assert ("--stronglyTyped" in argv) is strong_flag and "--noTF32" in argv
            assert "--int8" not in argv and "--fp16" not in argv and "--best" not in argv


def test_int8_print_trtexec_and_refusals_via_cli(tmp_path, run_cli):
    out = make_synthetic_export(tmp_path / "int8", "int8", qdq="symmetric")
    code, stdout, err = run_cli("build-engine", str(out), "--print-trtexec")
    assert code == 0, err
    lines = [ln for ln in stdout.splitlines() if ln.startswith("trtexec")]
    assert len(lines) == 2 and all("--stronglyTyped" in ln and "--int8" not in ln for ln in lines)
    assert "# int8: explicit quantization" in stdout
    for qdq, msg in (("uint8", "quantizes activations as uint8 with non-zero zero points"),
                     ("dynamic", "dynamic int8 quantization")):
        bad = make_synthetic_export(tmp_path / qdq, "int8", qdq=qdq)
        before = listing(bad)
        for extra in ((), ("--print-trtexec",)):
            code, _, err = run_cli("build-engine", str(bad), *extra)
            assert code == 2 and msg in err and one_line(err), (qdq, extra, err)
        assert listing(bad) == before


# ---- the build flow on the simulation (ORCHESTRATION ONLY) ---------------------------------------------------

def test_orchestration_int8_on_trt10_and_trt11(tmp_path, sim, run_cli):
    out = make_synthetic_export(tmp_path / "int8", "int8", qdq="symmetric")
    for trt, flags in ((SimTRT(version="10.99.0-sim"), 1 << 5), (SimTRT(version="11.0.0-sim", weak=False), 0)):
        sim.trt = trt
        code, stdout, err = run_cli("build-engine", str(out), "--json", "--force")
        assert code == 0, err
        meta = json.loads(stdout)
        assert meta["precision"] == "int8" and "explicit int8 quantization" in meta["build_mode"]
        assert {r: e["precision"] for r, e in meta["engines"].items()} == {"encoder": "int8", "decoder": "fp32"}
        # no INT8/FP16 builder flag reached the builder (the simulation refuses INT8 on a strongly typed network
        # and a weakly typed Q/DQ network without it); TF32 cleared
        assert [(b["flags"], b["config_flags"]) for b in trt.builds] == [(flags, []), (flags, [])]
        p = meta["parity"]
        assert p["passed"] and "int8" in p["gate"] and "the fp32 decoder alone" in p["gate"]
        assert json.loads((out / "engine.json").read_text())["build_mode"] == meta["build_mode"]


def test_orchestration_int8_gate(tmp_path, sim, run_cli):
    """An int8 encoder is held to mask IoU end to end; its fp32 decoder alone to max |diff|."""
    out = make_synthetic_export(tmp_path / "int8", "int8", qdq="symmetric")
    sim.trt = SimTRT(noise=0.01, noisy=("image_embeddings",))  # a small embedding offset: IoU passes
    code, stdout, err = run_cli("build-engine", str(out), "--json")
    assert code == 0, err
    assert json.loads(stdout)["parity"]["embedding_max_abs_diff"] > 0
    sim.trt = SimTRT(noise=0.5, noisy=("low_res_masks",))  # the decoder engine off by 0.5: refused
    before = listing(out)
    code, _, err = run_cli("build-engine", str(out), "--force")
    assert code == 1 and "the masks of the decoder alone differs" in err and "nothing was written" in err, err
    assert listing(out) == before


def test_simulation_enforces_the_documented_typing_rules(tmp_path, sim):
    """The two rules the int8 tests rely on, so that they can fail: a weakly typed Q/DQ network needs
    BuilderFlag.INT8 (TensorRT 10), a strongly typed one refuses precision flags."""
    path = save_graph(encoder_graph("symmetric"), tmp_path / "encoder.onnx")
    trt = sim.trt
    builder = trt.Builder(type("L", (), {"log": lambda self, sev, msg: None})())
    for flags, config_flags, ok in ((0, set(), False), (0, {3}, True), (1 << 5, {3}, False), (1 << 5, set(), True)):
        network = builder.create_network(flags)
        trt.OnnxParser(network, None).parse_from_file(str(path))
        config = builder.create_builder_config()
        for f in config_flags:
            config.set_flag(f)
        assert (builder.build_serialized_network(network, config) is not None) is ok, (flags, config_flags)
